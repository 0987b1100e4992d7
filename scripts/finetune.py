#!/usr/bin/env python
"""Launch the LoRA finetune on every rank (msrun or rank table), wait for all of them, collect
checkpoint_network/, loss.tsv, adapter_config.json and the rank logs. Resumes an interrupted run."""

import json

from lorapipe import cli
from lorapipe.train.finetune import reproducibility, run_finetune


def main():
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="rendered MindFormers YAML")
    p.add_argument("--worker", required=True, help="the per-rank script (scripts/finetune_worker.py)")
    p.add_argument("--state_dir", required=True, help="resumable training state (kept between runs)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--parallel", required=True, type=json.loads,
                   help="JSON: launcher, workers, nodes, master_addr, master_port, visible_devices")
    p.add_argument("--rank_table", default="", help="HCCL rank table (launcher rank_table)")
    p.add_argument("--base_model", default="", help="the HF base model (recorded in adapter_config.json)")
    p.add_argument("--inputs", nargs="*", default=[], help="base checkpoint and data: recorded, and part "
                                                          "of the resume key")
    p.add_argument("--device_target", default="CPU")
    p.add_argument("--restart_if_damaged", type=cli.str2bool, default=False,
                   help="train from step 0 when no step has a complete checkpoint on every rank (else refuse)")
    args = p.parse_args()
    par = args.parallel
    run = cli.start(args, par, device_target=args.device_target, deterministic=False, note=reproducibility(
        args.device_target, par["workers"] * par["nodes"]))
    run_finetune(args.config, args.worker, args.state_dir, args.out_dir, workers=par["workers"],
                 launcher=par["launcher"], nodes=par["nodes"], master_addr=par["master_addr"],
                 master_port=par["master_port"], rank_table=args.rank_table or None,
                 visible_devices=par["visible_devices"].split(","), device_target=args.device_target,
                 base_model=args.base_model, run=run, inputs=args.inputs,
                 restart_if_damaged=args.restart_if_damaged)


if __name__ == "__main__":
    cli.main_guard(main)
