#!/usr/bin/env python
"""Held-out loss and perplexity of the finetuned model (and a second one, e.g. the base) on a
MindRecord, masked as in training: only assistant tokens and end-of-turn markers count."""

from lorapipe import cli
from lorapipe.infer.evaluate import evaluate
from lorapipe.infer.loader import on_device, trained_model


def main():
    p = cli.parser(__doc__)
    cli.add_trained_model_flags(p)
    p.add_argument("--eval_dataset", required=True, help="held-out .mindrecord")
    p.add_argument("--output", required=True, help="metrics.json")
    args = p.parse_args()
    run = cli.start(args, {})
    # The training YAML's model, on its device (one NPU on Ascend) in the dtypes it trained in; the host
    # computes in fp32 whatever they are.
    model = trained_model(args.config, args.load_checkpoint, args.compare_checkpoint, args.adapter_config)
    _, config = on_device(model)
    evaluate(model.checkpoints, config, args.eval_dataset, args.output, adapter=model.adapter, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
