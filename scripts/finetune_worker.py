#!/usr/bin/env python
"""One training rank of the LoRA finetune: MindFormers' Trainer on the rendered YAML. Started on every
rank by scripts/finetune.py (under msrun, or the rank-table launcher); imports MindSpore."""

import argparse
import os

from lorapipe.train.launch import worker_status
from lorapipe.train.processes import attach_to_launcher


def main():
    attach_to_launcher()  # first: die with the launcher, before seconds of imports
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="rendered MindFormers YAML")
    p.add_argument("--output_dir", required=True, help="MindFormers output_dir (checkpoints, strategy)")
    p.add_argument("--loss_tsv", required=True, help="per-step TSV; {rank} is replaced by the rank")
    p.add_argument("--resume", default=None, help="checkpoint folder (with rank_*/) to continue from")
    p.add_argument("--load_checkpoint", default=None,
                   help="the base to start from instead of the YAML's (a folder with rank_*/: safetensors)")
    p.add_argument("--resume_checkpoint", default=None,
                   help="the file to continue from, as rank 0 names it (each rank reads its own rank_<r>/ copy)")
    p.add_argument("--only_save_strategy", action="store_true",
                   help="compile, write output_dir/strategy/ckpt_strategy_rank_<r>.ckpt and stop (a first check "
                        "of the parallel layout on the hardware)")
    args = p.parse_args()
    with worker_status(int(os.environ.get("RANK_ID", "0"))):
        from lorapipe.train.trainer import finetune

        finetune(args.config, args.output_dir, args.loss_tsv, resume_from=args.resume,
                 resume_checkpoint=args.resume_checkpoint, load_checkpoint=args.load_checkpoint,
                 only_save_strategy=args.only_save_strategy)


if __name__ == "__main__":
    main()
