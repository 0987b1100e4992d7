#!/usr/bin/env python
"""Export a complete (LoRA-folded) MindSpore Baichuan2 checkpoint as an HF model directory:
model.safetensors, pytorch_model.bin, config.json, tokenizer.model."""

from lorapipe import cli
from lorapipe.weights.convert import export_hf


def main():
    p = cli.parser(__doc__)
    p.add_argument("--mindspore_ckpt_path", required=True)
    p.add_argument("--base_model_dir", required=True, help="the HF base model: config and tokenizer files")
    p.add_argument("--out_dir", required=True)
    args = p.parse_args()
    run = cli.start(args, {})
    export_hf(args.mindspore_ckpt_path, args.base_model_dir, args.out_dir, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
