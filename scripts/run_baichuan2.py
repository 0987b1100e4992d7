#!/usr/bin/env python
"""The recipe's run_baichuan2.py for prediction, with its flags and their meaning:

    python scripts/run_baichuan2.py --config <R>/predict/run_baichuan2.yaml --run_mode predict \\
        --use_parallel False --load_checkpoint <R>/merged_lora/rank_0/merged_lora.ckpt \\
        --auto_trans_ckpt False --predict_data "<reserved_106>你是谁？<reserved_107>"

The tokenizer is the YAML's processor.tokenizer.vocab_file (or --vocab_file), the generation settings
are the YAML's model_config (top_k, top_p, do_sample, ...; flags override them). A checkpoint that
holds LoRA tensors (merged_ckpt) is folded on load with the trained run's scale: --adapter_config, or
the YAML's pet_config. Answers go to --output as JSON lines, or to stdout.
Training runs through the workflow (`snakemake finetune`), evaluation through scripts/evaluate.py.
"""

from pathlib import Path

from lorapipe import cli
from lorapipe.infer.generate import generation_settings, predict
from lorapipe.infer.loader import trained_model, use_device

RECIPE_IGNORED = ("task", "train_dataset", "eval_dataset", "resume", "remote_save_url", "src_strategy")


def parse_args():
    p = cli.parser(__doc__)
    p.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    recipe = p.add_argument_group("the recipe's flags")
    recipe.add_argument("--config", required=True, help="rendered MindFormers YAML (predict or finetune)")
    recipe.add_argument("--run_mode", default="predict", help="predict (train and finetune run in the workflow)")
    recipe.add_argument("--load_checkpoint", required=True,
                        help="a complete .ckpt, or a folder holding rank_0/ with one complete .ckpt")
    recipe.add_argument("--predict_data", nargs="+", required=True,
                        help="prompts (plain, or already as <reserved_106>q<reserved_107>), or @file, one per line")
    recipe.add_argument("--use_parallel", type=cli.str2bool, default=False, help="False: one device")
    recipe.add_argument("--auto_trans_ckpt", type=cli.str2bool, default=False,
                        help="transform a distributed checkpoint for this layout; on one device with a "
                             "complete checkpoint there is nothing to transform")
    recipe.add_argument("--vocab_file", default=None, help="tokenizer.model (default: the YAML's)")
    recipe.add_argument("--seq_length", type=int, default=None, help="model sequence length (default: the YAML's)")
    recipe.add_argument("--max_length", type=int, default=None, help="cap on prompt + answer tokens")
    recipe.add_argument("--device_id", type=int, default=None)
    recipe.add_argument("--mode", type=int, choices=[0, 1], default=None, help="0 graph, 1 PyNative")
    for flag in ("--dp", "--mp", "--pp", "--micro_batch_num"):
        recipe.add_argument(flag, type=int, default=None, help="parallel layout (one device here: 1)")
    for flag in RECIPE_IGNORED:
        recipe.add_argument(f"--{flag}", default=None, help="training flag; not used for prediction")
    chat = p.add_argument_group("generation (run_baichuan2_chat.py's flags; default: the YAML's)")
    cli.add_generation_flags(chat)
    chat.add_argument("--use_past", type=cli.str2bool, default=True, help="incremental decoding (default True)")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed")
    extra = p.add_argument_group("lorapipe")
    extra.add_argument("--adapter_config", default=None,
                       help="adapter_config.json of the run that trained the LoRA tensors in --load_checkpoint")
    extra.add_argument("--compare_checkpoint", default=None, help="a second model (e.g. the base), side by side")
    extra.add_argument("--output", default=None, help="predictions.jsonl (default: print to stdout)")
    args = p.parse_args()
    if args.run_mode != "predict":
        p.error(f"--run_mode {args.run_mode}: this script predicts; train with `snakemake finetune`, evaluate "
                f"with scripts/evaluate.py")
    if args.use_parallel or any((getattr(args, k) or 1) != 1 for k in ("dp", "mp", "pp")):
        p.error("--use_parallel True / --dp, --mp, --pp > 1: prediction runs on one device, as the recipe's "
                "Baichuan2-7B predict; merge distributed checkpoints first (snakemake merged_ckpt)")
    return p, args


def main():
    _, args = parse_args()
    # One device: a complete checkpoint, or a folder holding rank_0/ with one, needs no transformation,
    # so --auto_trans_ckpt True and False load the same weights here.
    model = trained_model(args.config, args.load_checkpoint, args.compare_checkpoint, args.adapter_config,
                          args.vocab_file, seq_length=args.seq_length)
    generation = generation_settings(model.model_config, vars(args))
    generation.update(seed=args.seed, use_past=args.use_past, max_length=args.max_length)
    run = cli.start(args, generation)
    prompts = []
    for item in args.predict_data:
        prompts += Path(item[1:]).read_text(encoding="utf-8").splitlines() if item.startswith("@") else [item]
    device_target = use_device(model.rendered, args.mode, args.device_id)
    predict(model.checkpoints, model.tokenizer, model.model_config, [q for q in prompts if q.strip()], generation,
            args.output, adapter=model.adapter, device_target=device_target, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
