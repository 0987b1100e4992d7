#!/usr/bin/env python
"""Import a PEFT LoRA adapter for the Llama layout (q_proj/k_proj/v_proj, o_proj, gate/up/down_proj) or
Baichuan2's W_pack onto a base MindSpore checkpoint:

    import_peft.py --adapter_dir A --base_ckpt <R>/ckpt/rank_0/<name>.ckpt \\
        --dst_ckpt lora.ckpt --dst_adapter_config adapter_config.json     # LoRA tensors, for fold_lora,
                                                                          # run_baichuan2.py, evaluate.py
    import_peft.py --adapter_dir A --base_ckpt ... --dst_ckpt folded.ckpt --fold   # folded in; then
                                                                          # export_hf.py gives W_pack
"""

import argparse

from lorapipe import cli
from lorapipe.exports.peft import import_peft


def main():
    p = cli.parser(__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--adapter_dir", required=True, help="PEFT adapter folder (adapter_config.json, adapter_model.*)")
    p.add_argument("--base_ckpt", required=True, help="the base model's MindSpore checkpoint (the ckpt step's)")
    p.add_argument("--dst_ckpt", required=True)
    p.add_argument("--dst_adapter_config", default=None, help="adapter_config.json for the LoRA tensors")
    p.add_argument("--fold", action="store_true", help="fold the adapter into the weights instead")
    args = p.parse_args()
    if not args.fold and not args.dst_adapter_config:
        p.error("--dst_adapter_config is needed unless --fold")
    run = cli.start(args, {"fold": args.fold})
    import_peft(args.adapter_dir, args.base_ckpt, args.dst_ckpt, args.dst_adapter_config, fold_in=args.fold, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
