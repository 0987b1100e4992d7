#!/usr/bin/env python
"""Chat data (BELLE, ShareGPT, Alpaca or OpenAI messages; JSON or JSON Lines) -> MindRecord rows of
seq_length + 1 tokens (the recipe's belle_preprocess.py), with an optional deterministic held-out split
and a stats JSON.

Either the recipe's flags (--input_glob, --seq_length, ...) or --data, the workflow config's data
section as JSON, which can also name several sources with formats and weights."""

import json

from lorapipe import cli
from lorapipe.data.pipeline import preprocess_conversations
from lorapipe.data.sources import FORMATS
from lorapipe.data.turns import DROPPABLE

# The data settings, as the config's data section names them, and their defaults without --data.
SETTINGS = {"format": "auto", "seq_length": 512, "heldout_fraction": 0.0, "split_seed": 0, "on_bad_record": "fail",
            "drop": [], "packing": False}


def main():
    p = cli.parser(__doc__)
    p.add_argument("--input_glob", help="chat JSON/JSONL file, or a glob of them")
    p.add_argument("--format", choices=["auto", *FORMATS], help="layout of the files (default: auto, per file)")
    p.add_argument("--seq_length", type=int, help="default 512")
    p.add_argument("--heldout_fraction", type=float, help="default 0")
    p.add_argument("--split_seed", type=int, help="default 0")
    p.add_argument("--on_bad_record", choices=["fail", "skip"], help="malformed records: default fail")
    p.add_argument("--drop", action="append", choices=DROPPABLE, metavar="KIND",
                   help=f"leave out records of this kind (repeatable): {', '.join(DROPPABLE)}; default none")
    p.add_argument("--packing", action="store_true", default=None,
                   help="pack several conversations into each training row, with a segment_ids column")
    p.add_argument("--data", type=json.loads,
                   help='the config\'s data section as JSON instead of the flags above, e.g. {"train": '
                        '[{"path": "a.jsonl", "format": "alpaca", "weight": 0.5}], "format": "auto", '
                        '"seq_length": 512, "heldout_fraction": 0.01, "split_seed": 0, "on_bad_record": "fail", '
                        '"drop": [], "packing": false}')
    p.add_argument("--sample_seed", type=int, default=0, help="draws the samples of fractional source weights")
    p.add_argument("--model_file", required=True, help="sentencepiece tokenizer.model")
    p.add_argument("--output_file", required=True, help="the training .mindrecord (its .db is written too)")
    p.add_argument("--heldout_output_file", default=None, help="write the held-out split here")
    p.add_argument("--stats_file", default=None)
    args = p.parse_args()
    flags = {key: getattr(args, key) for key in SETTINGS if getattr(args, key) is not None}
    if args.data is not None:
        if args.input_glob or flags:
            p.error("--data replaces --input_glob, " + ", ".join(f"--{k}" for k in SETTINGS) + "; give one or the other")
        data = {**SETTINGS, **args.data}
    elif args.input_glob:
        data = {**SETTINGS, **flags, "train": args.input_glob}
    else:
        p.error("give --input_glob (with the recipe's flags) or --data")
    run = cli.start(args, {**data, "sample_seed": args.sample_seed})
    preprocess_conversations(data["train"], args.model_file, args.output_file, data["seq_length"],
                             heldout_file=args.heldout_output_file, heldout_fraction=data["heldout_fraction"],
                             split_seed=data["split_seed"], on_bad_record=data["on_bad_record"], drop=data["drop"],
                             packing=data["packing"], data_format=data["format"], sample_seed=args.sample_seed,
                             stats_file=args.stats_file, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
