#!/usr/bin/env python
"""Fold LoRA adapters into the base weights, W += (B @ A) * alpha / rank, with the rank and alpha of
the run that trained them (its adapter_config.json) -> a checkpoint the plain Baichuan2 model loads."""

from lorapipe import cli
from lorapipe.weights.checkpoints import fold_lora


def main():
    p = cli.parser(__doc__)
    p.add_argument("--src_ckpt", required=True, help="complete checkpoint with mindpet_delta_lora_a/_b")
    p.add_argument("--adapter_config", required=True, help="the finetune's adapter_config.json (r, lora_alpha)")
    p.add_argument("--dst_ckpt", required=True)
    args = p.parse_args()
    run = cli.start(args, {})
    fold_lora(args.src_ckpt, args.dst_ckpt, args.adapter_config, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
