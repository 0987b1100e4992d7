#!/usr/bin/env python
"""BELLE chat JSON -> MindRecord rows of seq_length + 1 tokens (the recipe's belle_preprocess.py),
with an optional deterministic held-out split and a stats JSON."""

from lorapipe import cli
from lorapipe.data import preprocess_belle


def main():
    p = cli.parser(__doc__)
    p.add_argument("--input_glob", required=True, help="BELLE chat JSON file, or a glob of them")
    p.add_argument("--model_file", required=True, help="sentencepiece tokenizer.model")
    p.add_argument("--output_file", required=True, help="the training .mindrecord (its .db is written too)")
    p.add_argument("--seq_length", type=int, default=512)
    p.add_argument("--heldout_output_file", default=None, help="write the held-out split here")
    p.add_argument("--heldout_fraction", type=float, default=0.0)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--on_bad_record", choices=["fail", "skip"], default="fail")
    p.add_argument("--stats_file", default=None)
    args = p.parse_args()
    run = cli.start(args, {k: getattr(args, k) for k in ("seq_length", "heldout_fraction", "split_seed",
                                                         "on_bad_record")})
    preprocess_belle(args.input_glob, args.model_file, args.output_file, args.seq_length,
                     heldout_file=args.heldout_output_file, heldout_fraction=args.heldout_fraction,
                     split_seed=args.split_seed, on_bad_record=args.on_bad_record,
                     stats_file=args.stats_file, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
