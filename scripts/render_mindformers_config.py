#!/usr/bin/env python
"""Render the MindFormers finetune YAML (the file the recipe had users edit by hand) from settings."""

import json

from lorapipe import cli
from lorapipe.finetune import render_mindformers_config, write_mindformers_config


def main():
    p = cli.parser(__doc__)
    p.add_argument("--hf_config", required=True, help="the base model's config.json")
    p.add_argument("--base_ckpt", required=True)
    p.add_argument("--train_data", required=True, help="training .mindrecord")
    p.add_argument("--settings", required=True, help="JSON: name, seq_length, device_target, lora, train, parallel")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    settings = json.loads(args.settings)
    run = cli.start(args, settings, device_target=settings["device_target"])
    with open(args.hf_config, encoding="utf-8") as f:
        hf_config = json.load(f)
    rendered = render_mindformers_config(hf_config, base_ckpt=args.base_ckpt, train_data=args.train_data,
                                         **settings)
    write_mindformers_config(args.output, rendered, run=run, inputs=[args.hf_config])


if __name__ == "__main__":
    cli.main_guard(main)
