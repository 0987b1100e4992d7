#!/usr/bin/env python
"""Held-out loss and perplexity of the finetuned model (and a second one, e.g. the base) on a
MindRecord, masked as in training: only assistant tokens and end-of-turn markers count."""

from lorapipe import cli
from lorapipe.infer.evaluate import evaluate
from lorapipe.infer.loader import trained_model, use_device


def main():
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="rendered MindFormers YAML (the finetune's: model settings)")
    p.add_argument("--load_checkpoint", required=True, help="complete checkpoint (or a folder with rank_0/)")
    p.add_argument("--compare_checkpoint", default=None, help="a second model, e.g. the base")
    p.add_argument("--adapter_config", default=None,
                   help="adapter_config.json of the run that trained LoRA tensors in the checkpoint")
    p.add_argument("--eval_dataset", required=True, help="held-out .mindrecord")
    p.add_argument("--output", required=True, help="metrics.json")
    args = p.parse_args()
    run = cli.start(args, {})
    # The training YAML's model, on its device (one NPU on Ascend) in the dtypes it trained in; the host
    # computes in fp32 whatever they are.
    model = trained_model(args.config, args.load_checkpoint, args.compare_checkpoint, args.adapter_config)
    if use_device(model.rendered) == "CPU":
        model.model_config.update(compute_dtype="float32", param_init_type="float32")
    evaluate(model.checkpoints, model.model_config, args.eval_dataset, args.output, adapter=model.adapter, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
