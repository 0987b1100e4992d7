#!/usr/bin/env python
"""Render a MindFormers YAML from the workflow config: the finetune YAML the recipe had users edit by
hand (--run_mode finetune), or the recipe's predict YAML (--run_mode predict)."""

import json

from lorapipe import cli
from lorapipe.finetune import render_mindformers_config, render_predict_config, write_mindformers_config


def main():
    p = cli.parser(__doc__)
    p.add_argument("--run_mode", choices=["finetune", "predict"], default="finetune")
    p.add_argument("--hf_config", required=True, help="the base model's config.json")
    p.add_argument("--tokenizer", required=True, help="the base model's tokenizer.model")
    p.add_argument("--device_target", required=True, choices=["CPU", "Ascend", "GPU"])
    p.add_argument("--name", required=True, help="model name (base_model.name)")
    p.add_argument("--position_embedding", choices=["auto", "rope", "alibi"], default="auto",
                   help="base_model.position_embedding: auto (from config.json), or rope / alibi")
    p.add_argument("--output", required=True)
    finetune = p.add_argument_group("finetune")
    finetune.add_argument("--seq_length", type=int, help="training sequence length (data.seq_length)")
    finetune.add_argument("--base_ckpt_dir", help="the folder holding rank_0/<name>.ckpt")
    finetune.add_argument("--train_data", help="training .mindrecord")
    finetune.add_argument("--lora", type=json.loads, help="JSON: the config's lora section")
    finetune.add_argument("--train", type=json.loads, help="JSON: the config's train section")
    finetune.add_argument("--parallel", type=json.loads,
                          help="JSON: data_parallel, model_parallel, pipeline_stage, max_device_memory")
    predict = p.add_argument_group("predict")
    predict.add_argument("--generation", type=json.loads, help="JSON: the config's predict section, less prompts")
    args = p.parse_args()
    needed = ("seq_length", "base_ckpt_dir", "train_data", "lora", "train", "parallel") if args.run_mode == "finetune" \
        else ("generation",)
    missing = [f"--{k}" for k in needed if getattr(args, k) is None]
    if missing:
        p.error(f"--run_mode {args.run_mode} needs {', '.join(missing)}")
    settings = {k: getattr(args, k) for k in ("device_target", "name", "position_embedding", *needed)}
    run = cli.start(args, settings, device_target=args.device_target)
    with open(args.hf_config, encoding="utf-8") as f:
        hf_config = json.load(f)
    if args.run_mode == "finetune":
        rendered = render_mindformers_config(hf_config, tokenizer=args.tokenizer, **settings)
    else:
        rendered = render_predict_config(hf_config, tokenizer=args.tokenizer, **settings)
    write_mindformers_config(args.output, rendered, run=run, inputs=[args.hf_config, args.tokenizer])


if __name__ == "__main__":
    cli.main_guard(main)
