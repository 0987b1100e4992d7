#!/usr/bin/env python
"""Accuracy of the finetuned model and the base on a multiple-choice benchmark (C-Eval, CMMLU or MMLU),
scored as lm-evaluation-harness 0.4.x's hf backend scores it (lorapipe/infer/scoring.py)."""

import json
from pathlib import Path

from lorapipe import cli
from lorapipe.infer.loader import trained_model
from lorapipe.infer.scoring import lm_eval_max_length, score_task, scorers, write_results
from lorapipe.infer.tasks import load_task
from lorapipe.model.tokenizer import ChatTokenizer
from lorapipe.outputs import atomic_outputs


def main():
    p = cli.parser(__doc__)
    cli.add_trained_model_flags(p)
    p.add_argument("--hf_config", required=True,
                   help="the base model's config.json: its positions are the prompts' maximum length, as in lm-eval")
    p.add_argument("--task", required=True, help="one evaluate.tasks entry, as JSON")
    p.add_argument("--output", required=True, help="<name>.json: accuracy overall, per group and per subject")
    p.add_argument("--samples", required=True, help="<name>.samples.jsonl: one line per question")
    args = p.parse_args()
    entry = json.loads(args.task)
    run = cli.start(args, {"task": entry})
    model = trained_model(args.config, args.load_checkpoint, args.compare_checkpoint, args.adapter_config)
    max_length = lm_eval_max_length(json.loads(Path(args.hf_config).read_text()))
    task = load_task(entry)
    samples, summary = score_task(task, ChatTokenizer(model.tokenizer), scorers(model, max_length), max_length)
    summary["models"] = {label: str(path) for label, path in model.checkpoints.items()}
    with atomic_outputs([args.output, args.samples], run=run,
                        inputs=[*model.checkpoints.values(), entry["path"], args.hf_config]) as (out, out_samples):
        write_results(samples, summary, out, out_samples)
    overall = summary["overall"]
    cli.log.info("%s: accuracy %s", task.name, ", ".join(f"{m} {overall[m]:.4f}" for m in model.checkpoints
                                                          if m in overall))


if __name__ == "__main__":
    cli.main_guard(main)
