#!/usr/bin/env python
"""Fold LoRA adapters into the base weights, W += (B @ A) * alpha / rank, with the alpha and rank the
adapter was trained with -> a checkpoint the plain Baichuan2 model loads."""

from lorapipe import cli
from lorapipe.checkpoints import fold_lora


def main():
    p = cli.parser(__doc__)
    p.add_argument("--src_ckpt", required=True, help="complete checkpoint with mindpet_delta_lora_a/_b")
    p.add_argument("--dst_ckpt", required=True)
    p.add_argument("--lora_alpha", type=float, required=True)
    p.add_argument("--lora_rank", type=int, required=True)
    args = p.parse_args()
    run = cli.start(args, {"lora_alpha": args.lora_alpha, "lora_rank": args.lora_rank})
    fold_lora(args.src_ckpt, args.dst_ckpt, args.lora_alpha, args.lora_rank, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
