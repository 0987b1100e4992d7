#!/usr/bin/env python
"""Merge per-node HCCL rank tables into one multi-node table (ranks renumbered in the given order)."""

import json

from lorapipe import cli
from lorapipe.outputs import atomic_outputs
from lorapipe.train.ranktable import load_rank_table, merge_rank_tables


def main():
    p = cli.parser(__doc__)
    p.add_argument("tables", nargs="+", help="per-node rank tables, node 0 first")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    run = cli.start(args, {}, device_target="Ascend")
    merged = merge_rank_tables([load_rank_table(t) for t in args.tables])
    with atomic_outputs([args.output], run=run, inputs=args.tables) as (tmp,):
        tmp.write_text(json.dumps(merged, indent=4) + "\n")


if __name__ == "__main__":
    cli.main_guard(main)
