#!/usr/bin/env python
"""Write the embedded tiny Baichuan2-shaped HF base model (weights, config, tokenizer)."""

import json

from lorapipe import cli
from lorapipe.weights.tiny_base import build_tiny_base


def main():
    p = cli.parser(__doc__)
    p.add_argument("--data", required=True, nargs="+", help="chat JSON files the tokenizer is trained on")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--dims", required=True, type=json.loads,
                   help='JSON: the config\'s tiny_base section, e.g. {"seed": 0, "hidden_size": 64, ...}')
    args = p.parse_args()
    run = cli.start(args, args.dims)
    build_tiny_base(args.data, args.out_dir, run=run, **args.dims)


if __name__ == "__main__":
    cli.main_guard(main)
