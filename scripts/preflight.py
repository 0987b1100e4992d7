#!/usr/bin/env python
"""Check a finetune before any rank starts, on the host and without a device: devices and rank table,
the converted checkpoint against the network the YAML builds, tokenizer, data, memory per device, and
shard strategies. Writes preflight.json and prints one table; fails naming every failed check."""

import json
from pathlib import Path

from lorapipe import cli
from lorapipe.train.preflight import format_checks, run_preflight, write_preflight_json


def main():
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="the rendered finetune YAML")
    p.add_argument("--base_ckpt", required=True, help="the converted base checkpoint")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--train_data", required=True, help="training .mindrecord")
    p.add_argument("--parallel", required=True, type=json.loads,
                   help="JSON: launcher, workers, nodes, visible_devices, hccn_conf")
    p.add_argument("--rank_table", default="", help="the HCCL rank table (launcher rank_table)")
    p.add_argument("--hf_config", required=True, help="the base model's config.json (its positions)")
    p.add_argument("--allow_seq_length_over_max_positions", action="store_true",
                   help="warn instead of failing when seq_length exceeds the model's positions")
    p.add_argument("--output", required=True, help="preflight.json")
    args = p.parse_args()
    run = cli.start(args, args.parallel)
    checks = run_preflight(args.config, args.base_ckpt, args.tokenizer, args.train_data, args.parallel,
                           args.rank_table or None, args.parallel["hccn_conf"],
                           hf_config=json.loads(Path(args.hf_config).read_text()),
                           allow_longer=args.allow_seq_length_over_max_positions)
    cli.log.info("preflight:\n%s", format_checks(checks))
    write_preflight_json(checks, args.output, run=run,
                 inputs=[args.config, args.base_ckpt, args.tokenizer, args.train_data, args.hf_config,
                         *([args.rank_table] if args.rank_table else [])])


if __name__ == "__main__":
    cli.main_guard(main)
