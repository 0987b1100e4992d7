#!/usr/bin/env python
"""Figures and the summary table for `snakemake --report`."""

from pathlib import Path

from lorapipe import cli
from lorapipe.outputs import atomic_outputs
from lorapipe.report import plot_lengths, plot_loss, plot_subject_deltas, summary_html


def main():
    p = cli.parser(__doc__)
    p.add_argument("--loss_tsv", required=True)
    p.add_argument("--data_stats", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--predictions", required=True)
    p.add_argument("--tasks", nargs="*", default=[], help="the benchmarks' results, <results>/evaluate/<name>.json")
    p.add_argument("--out_dir", required=True)
    args = p.parse_args()
    run = cli.start(args, {})
    out = Path(args.out_dir)
    inputs = [args.loss_tsv, args.data_stats, args.metrics, args.predictions, *args.tasks]
    task_pngs = [out / f"{Path(t).stem}_subjects.png" for t in args.tasks]
    with atomic_outputs([out / "loss.png", out / "lengths.png", out / "summary.html", *task_pngs], run=run,
                        inputs=inputs) as (loss_png, lengths_png, summary, *task_tmps):
        plot_loss(args.loss_tsv, loss_png)
        plot_lengths(args.data_stats, lengths_png)
        for task, png in zip(args.tasks, task_tmps):
            plot_subject_deltas(task, png)
        summary_html(args.metrics, args.data_stats, args.predictions, summary, tasks=args.tasks,
                     figures=[(loss_png, "Training loss"), (lengths_png, "Conversation lengths"),
                              *((png, f"{Path(t).stem}: accuracy by subject, finetuned - base")
                                for t, png in zip(args.tasks, task_tmps))])


if __name__ == "__main__":
    cli.main_guard(main)
