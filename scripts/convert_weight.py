#!/usr/bin/env python
"""Convert Baichuan2 HF torch weights to a MindSpore checkpoint (the recipe's convert_weight.py),
streaming one tensor at a time."""

from lorapipe import cli
from lorapipe.weights.convert import DTYPES, convert_hf_to_mindspore


def main():
    p = cli.parser(__doc__)
    p.add_argument("--torch_ckpt_path", required=True,
                   help="pytorch_model.bin, model.safetensors, *.index.json or an HF model directory")
    p.add_argument("--mindspore_ckpt_path", required=True, help="the .ckpt to write")
    p.add_argument("--dtype", choices=list(DTYPES), default="keep", help="default: the source's dtype")
    args = p.parse_args()
    run = cli.start(args, {"dtype": args.dtype})
    convert_hf_to_mindspore(args.torch_ckpt_path, args.mindspore_ckpt_path, args.dtype, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
