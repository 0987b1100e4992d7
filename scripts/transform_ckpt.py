#!/usr/bin/env python
"""Merge distributed checkpoints into one complete checkpoint (the recipe's transform_ckpt.py):
with --src_ckpt_strategy, MindSpore's transform_checkpoints; without (pure data parallel), check that
every rank holds the same tensors and take rank 0's. Writes <dst_ckpt_dir>/rank_0/<prefix>0.ckpt."""

from pathlib import Path

from lorapipe import cli
from lorapipe.weights.checkpoints import merge_data_parallel, rank_checkpoints, transform_with_strategy


def main():
    p = cli.parser(__doc__)
    p.add_argument("--src_ckpt_strategy", default=None, help="strategy file or folder (semi-auto parallel)")
    p.add_argument("--dst_ckpt_strategy", default=None, help="only a complete checkpoint (None) is supported")
    p.add_argument("--src_ckpt_dir", required=True, help="folder with rank_<r>/*.ckpt")
    p.add_argument("--dst_ckpt_dir", required=True)
    p.add_argument("--prefix", default="checkpoint_")
    p.add_argument("--ranks", type=int, default=None, help="how many ranks must be there")
    args = p.parse_args()
    if args.dst_ckpt_strategy:
        raise cli.InputError("--dst_ckpt_strategy: lorapipe merges into one complete checkpoint only")
    run = cli.start(args, {"prefix": args.prefix, "ranks": args.ranks,
                           "with_strategy": bool(args.src_ckpt_strategy)})
    dst = Path(args.dst_ckpt_dir) / "rank_0" / f"{args.prefix}0.ckpt"
    if args.src_ckpt_strategy:
        rank_checkpoints(args.src_ckpt_dir, args.ranks)
        transform_with_strategy(args.src_ckpt_dir, dst, args.src_ckpt_strategy, args.prefix, run=run)
    else:
        merge_data_parallel(rank_checkpoints(args.src_ckpt_dir, args.ranks), dst, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
