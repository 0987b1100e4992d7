#!/usr/bin/env python
"""Figures and the summary table for `snakemake --report`."""

from pathlib import Path

from lorapipe import cli
from lorapipe.outputs import atomic_outputs
from lorapipe.report import plot_lengths, plot_loss, summary_html


def main():
    p = cli.parser(__doc__)
    p.add_argument("--loss_tsv", required=True)
    p.add_argument("--data_stats", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--predictions", required=True)
    p.add_argument("--out_dir", required=True)
    args = p.parse_args()
    run = cli.start(args, {})
    out = Path(args.out_dir)
    inputs = [args.loss_tsv, args.data_stats, args.metrics, args.predictions]
    with atomic_outputs([out / "loss.png", out / "lengths.png", out / "summary.html"], run=run,
                        inputs=inputs) as (loss_png, lengths_png, summary):
        plot_loss(args.loss_tsv, loss_png)
        plot_lengths(args.data_stats, lengths_png)
        summary_html(args.metrics, args.data_stats, args.predictions, summary,
                     figures=[(loss_png, "Training loss"), (lengths_png, "Conversation lengths")])


if __name__ == "__main__":
    cli.main_guard(main)
