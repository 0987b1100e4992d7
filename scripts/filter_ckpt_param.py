#!/usr/bin/env python
"""Drop optimizer state and bookkeeping from training checkpoints (the recipe's filter_ckpt_param.py),
streaming: every rank_<r>/*.ckpt of --src_ckpt_dir -> --dst_ckpt_dir/rank_<r>/."""

from lorapipe import cli
from lorapipe.weights.checkpoints import filter_checkpoint_dir


def main():
    p = cli.parser(__doc__)
    p.add_argument("--src_ckpt_dir", required=True, help="folder with rank_<r>/<name>.ckpt")
    p.add_argument("--dst_ckpt_dir", required=True)
    args = p.parse_args()
    run = cli.start(args, {})
    filter_checkpoint_dir(args.src_ckpt_dir, args.dst_ckpt_dir, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
