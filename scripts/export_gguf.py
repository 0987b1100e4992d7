#!/usr/bin/env python
"""Export a complete MindSpore Baichuan2-7B checkpoint (LoRA folded) as GGUF files for llama.cpp:
<out_dir>/<name>-<type>.gguf for each --type (f16, q8_0; f32 on request). Architecture llama (q/k
permuted for ggml's rotary layout, lm_head rows normalised), the SentencePiece vocabulary, no BOS added,
and the Baichuan2 chat template. An ALiBi model (Baichuan2-13B) is refused."""

from lorapipe import cli
from lorapipe.exports.gguf import TYPES, export_gguf


def main():
    p = cli.parser(__doc__)
    p.add_argument("--mindspore_ckpt_path", required=True, help="complete checkpoint without LoRA tensors")
    p.add_argument("--base_model_dir", required=True, help="the HF base model: config.json and tokenizer.model")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--name", required=True, help="file names <name>-<type>.gguf, and general.name")
    p.add_argument("--type", dest="types", action="append", choices=TYPES,
                   help="a file type to write (repeat); default f16 and q8_0")
    cli.add_position_embedding_flag(p)
    args = p.parse_args()
    types = tuple(dict.fromkeys(args.types or ("f16", "q8_0")))
    run = cli.start(args, {"name": args.name, "types": list(types), "position_embedding": args.position_embedding})
    export_gguf(args.mindspore_ckpt_path, args.base_model_dir, args.out_dir, args.name, args.position_embedding,
                types, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
