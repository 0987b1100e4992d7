#!/usr/bin/env python
"""Export the trained LoRA tensors of a MindSpore checkpoint (merged_ckpt, unfolded) as a standard PEFT
adapter for the Llama export (q_proj/k_proj/v_proj), and optionally for Baichuan2's W_pack layout (one
rank-3r adapter per layer: A stacked, B block diagonal)."""

from lorapipe import cli
from lorapipe.exports.peft import export_peft


def main():
    p = cli.parser(__doc__)
    p.add_argument("--src_ckpt", required=True, help="complete checkpoint with mindpet_delta_lora_a/_b")
    p.add_argument("--adapter_config", required=True, help="the finetune's adapter_config.json (r, lora_alpha)")
    p.add_argument("--out_dir", required=True, help="the PEFT adapter folder for the Llama layout")
    p.add_argument("--base_model_name_or_path", required=True,
                   help="what the adapter's config names as its base: the Llama export of the base model")
    p.add_argument("--w_pack_out_dir", default=None, help="also write the W_pack-layout adapter here")
    p.add_argument("--w_pack_base_model", default=None, help="its base: the Baichuan2 HF model")
    cli.add_position_embedding_flag(p)
    args = p.parse_args()
    run = cli.start(args, {"base_model_name_or_path": args.base_model_name_or_path,
                           "w_pack_base_model": args.w_pack_base_model, "position_embedding": args.position_embedding})
    export_peft(args.src_ckpt, args.adapter_config, args.out_dir, args.base_model_name_or_path, args.position_embedding,
                w_pack_dir=args.w_pack_out_dir, w_pack_base_model=args.w_pack_base_model, run=run)


if __name__ == "__main__":
    cli.main_guard(main)
