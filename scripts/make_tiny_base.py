#!/usr/bin/env python
"""Write the embedded tiny Baichuan2-shaped HF base model (weights, config, tokenizer)."""

from lorapipe import cli
from lorapipe.tiny_base import build_tiny_base


def main():
    p = cli.parser(__doc__)
    p.add_argument("--data", required=True, help="BELLE chat JSON the tokenizer is trained on")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_hidden_layers", type=int, default=2)
    p.add_argument("--num_attention_heads", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=176)
    p.add_argument("--max_position_embeddings", type=int, default=512)
    p.add_argument("--vocab_size", type=int, default=1000)
    p.add_argument("--init_std", type=float, default=0.02)
    args = p.parse_args()
    params = {k: v for k, v in vars(args).items() if k not in ("rule", "log", "data", "out_dir")}
    run = cli.start(args, params)
    build_tiny_base(args.data, args.out_dir, run=run, **params)


if __name__ == "__main__":
    cli.main_guard(main)
