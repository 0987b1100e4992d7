#!/usr/bin/env python
"""The experiments of a config side by side: a table (CSV and HTML) and the loss curves (snakemake compare)."""

import json
from pathlib import Path

from lorapipe import cli
from lorapipe.outputs import atomic_outputs
from lorapipe.report import compare_experiments


def main():
    p = cli.parser(__doc__)
    p.add_argument("--experiments", required=True, type=json.loads,
                   help='JSON {name: [results folder, [benchmark task names]]}')
    p.add_argument("--out_dir", required=True, help="<results>/compare")
    args = p.parse_args()
    run = cli.start(args, {"experiments": args.experiments})
    out = Path(args.out_dir)
    inputs = [Path(results) / f for results, _ in args.experiments.values()
              for f in ("evaluate/metrics.json", "finetune/loss.tsv")]
    with atomic_outputs([out / "compare.csv", out / "compare.html", out / "loss.png"], run=run,
                        inputs=inputs) as (csv_path, html_path, png):
        rows = compare_experiments(args.experiments, csv_path, html_path, png)
    for row in rows:
        cli.log.info("%s: held-out loss %.4f, %s trainable parameters", row["experiment"], row["heldout_loss"],
                     f"{row['trainable_parameters']:,}")


if __name__ == "__main__":
    cli.main_guard(main)
