#!/usr/bin/env python
"""The recipe's run_baichuan2.py: --run_mode finetune (one rank; started by scripts/finetune.py under
msrun or the rank-table launcher), predict (chat answers, base and finetuned side by side) or eval
(held-out loss and perplexity). Imports MindSpore and MindFormers."""

import os
from pathlib import Path

from lorapipe import cli
from lorapipe.launch import worker_status


def main():
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="rendered MindFormers YAML")
    p.add_argument("--run_mode", choices=["finetune", "predict", "eval"], default="finetune")
    # finetune
    p.add_argument("--output_dir", help="MindFormers output_dir (checkpoints, strategy)")
    p.add_argument("--loss_tsv", help="per-step TSV; {rank} is replaced by the rank")
    p.add_argument("--resume", default=None, help="checkpoint folder (with rank_*/) to continue from")
    # predict / eval
    p.add_argument("--load_checkpoint", help="complete checkpoint of the model (LoRA folded)")
    p.add_argument("--compare_checkpoint", default=None, help="a second model, e.g. the base, side by side")
    p.add_argument("--predict_data", nargs="+", default=[], help="prompts, or @file with one per line")
    p.add_argument("--eval_dataset", help="held-out .mindrecord")
    p.add_argument("--tokenizer", help="tokenizer.model")
    p.add_argument("--output", help="predictions.jsonl or metrics.json")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--do_sample", type=lambda v: v.lower() in ("1", "true", "yes"), default=False)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.run_mode == "finetune":
        with worker_status(int(os.environ.get("RANK_ID", "0"))):
            from lorapipe.trainer import finetune

            finetune(args.config, args.output_dir, args.loss_tsv, resume_from=args.resume)
        return

    from lorapipe.generate import evaluate, predict, read_model_config

    model_config = read_model_config(args.config)
    models = {"finetuned": args.load_checkpoint}
    if args.compare_checkpoint:
        models["base"] = args.compare_checkpoint
    if args.run_mode == "eval":
        run = cli.start(args, {})
        evaluate(models, model_config, args.eval_dataset, args.output, run=run)
        return
    generation = {k: getattr(args, k) for k in ("max_new_tokens", "do_sample", "top_k", "top_p", "temperature",
                                                "repetition_penalty", "seed")}
    run = cli.start(args, generation)
    prompts = []
    for item in args.predict_data:
        prompts += Path(item[1:]).read_text(encoding="utf-8").splitlines() if item.startswith("@") else [item]
    predict(models, args.tokenizer, model_config, [q for q in prompts if q.strip()], generation, args.output,
            run=run)


if __name__ == "__main__":
    cli.main_guard(main)
