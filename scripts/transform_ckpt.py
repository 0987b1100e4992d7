#!/usr/bin/env python
"""Merge distributed checkpoints into one complete checkpoint (the recipe's transform_ckpt.py):
with --src_ckpt_strategy, MindSpore's transform_checkpoints; without (pure data parallel), check that
every rank holds the same tensors and take rank 0's. Writes <dst_ckpt_dir>/rank_0/<prefix>0.ckpt (or
.safetensors, as the ranks').
With --base_ckpt (checkpoints of the trainable parameters only), the frozen base is put back in: the
same complete checkpoint as from checkpoints of the whole network."""

import tempfile
from pathlib import Path

from lorapipe import cli
from lorapipe.formats.msckpt import PARAMETER_ORDER
from lorapipe.weights.checkpoints import (
    complete_with_base,
    merge_data_parallel,
    rank_checkpoints,
    transform_with_strategy,
)


def main():
    p = cli.parser(__doc__)
    p.add_argument("--src_ckpt_strategy", default=None, help="strategy file or folder (semi-auto parallel)")
    p.add_argument("--dst_ckpt_strategy", default=None, help="only a complete checkpoint (None) is supported")
    p.add_argument("--src_ckpt_dir", required=True, help="folder with rank_<r>/*.ckpt")
    p.add_argument("--dst_ckpt_dir", required=True)
    p.add_argument("--prefix", default="checkpoint_")
    p.add_argument("--ranks", type=int, default=None, help="how many ranks must be there")
    p.add_argument("--base_ckpt", default=None,
                   help="the base the run trained on, when its checkpoints hold the trainable parameters only")
    args = p.parse_args()
    if args.dst_ckpt_strategy:
        raise cli.InputError("--dst_ckpt_strategy: lorapipe merges into one complete checkpoint only")
    run = cli.start(args, {"prefix": args.prefix, "ranks": args.ranks,
                           "with_strategy": bool(args.src_ckpt_strategy)})
    ckpts = rank_checkpoints(args.src_ckpt_dir, args.ranks)
    dst = Path(args.dst_ckpt_dir) / "rank_0" / f"{args.prefix}0{ckpts[0].suffix}"  # .ckpt or .safetensors
    with tempfile.TemporaryDirectory(prefix="lorapipe-merge-", dir=Path(args.dst_ckpt_dir).parent) as work:
        merged = Path(work) / dst.name if args.base_ckpt else dst
        if args.src_ckpt_strategy:
            transform_with_strategy(args.src_ckpt_dir, merged, args.src_ckpt_strategy, args.prefix,
                                    run=None if args.base_ckpt else run)
        else:
            merge_data_parallel(ckpts, merged, run=None if args.base_ckpt else run)
        if args.base_ckpt:
            complete_with_base(merged, ckpts[0].parent / PARAMETER_ORDER, args.base_ckpt, dst, run=run, inputs=ckpts)


if __name__ == "__main__":
    cli.main_guard(main)
