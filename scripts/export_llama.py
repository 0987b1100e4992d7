#!/usr/bin/env python
"""Export a complete MindSpore Baichuan2-7B checkpoint (LoRA folded, or the base) as a plain HF Llama
directory: model.safetensors (q/k/v split, lm_head rows normalised), config.json, generation_config.json,
tokenizer.model, tokenizer_config.json (with the chat template). transformers, vLLM and llama.cpp's
convert_hf_to_gguf.py load it without remote code."""

from lorapipe import cli
from lorapipe.exports.llama import export_llama


def main():
    p = cli.parser(__doc__)
    p.add_argument("--mindspore_ckpt_path", required=True, help="complete checkpoint without LoRA tensors")
    p.add_argument("--base_model_dir", required=True, help="the HF base model: config.json and tokenizer.model")
    p.add_argument("--out_dir", required=True)
    cli.add_position_embedding_flag(p)
    args = p.parse_args()
    run = cli.start(args, {"position_embedding": args.position_embedding})
    export_llama(args.mindspore_ckpt_path, args.base_model_dir, args.out_dir, args.position_embedding, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
