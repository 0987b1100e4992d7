#!/usr/bin/env python
"""Render a MindFormers YAML from the workflow config: the finetune YAML the recipe had users edit by
hand (--run_mode finetune), or the recipe's predict YAML (--run_mode predict)."""

import json

from lorapipe import cli
from lorapipe.train.mindformers_yaml import (
    render_mindformers_config,
    render_predict_config,
    write_mindformers_config,
)

RENDER = {"finetune": render_mindformers_config, "predict": render_predict_config}


def main():
    p = cli.parser(__doc__)
    p.add_argument("--run_mode", choices=sorted(RENDER), default="finetune")
    p.add_argument("--hf_config", required=True, help="the base model's config.json")
    p.add_argument("--tokenizer", required=True, help="the base model's tokenizer.model")
    p.add_argument("--settings", required=True, type=json.loads,
                   help="JSON: device_target, name, position_embedding (auto | rope | alibi), and for finetune "
                        "seq_length, base_ckpt_dir, train_data and the config's lora, train and parallel sections "
                        "(data_parallel, model_parallel, pipeline_stage, max_device_memory), for predict "
                        "generation (the config's predict section, less prompts)")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    run = cli.start(args, args.settings, device_target=args.settings.get("device_target", "CPU"))
    with open(args.hf_config, encoding="utf-8") as f:
        hf_config = json.load(f)
    try:
        rendered = RENDER[args.run_mode](hf_config, tokenizer=args.tokenizer, **args.settings)
    except TypeError as e:  # a setting missing or not known to this run mode
        raise cli.InputError(f"--settings for --run_mode {args.run_mode}: {e}") from None
    write_mindformers_config(args.output, rendered, run=run, inputs=[args.hf_config, args.tokenizer])


if __name__ == "__main__":
    cli.main_guard(main)
