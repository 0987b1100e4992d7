#!/usr/bin/env python
"""Launch the LoRA finetune on every rank (msrun or rank table), wait for all of them, collect
checkpoint_network/, loss.tsv, adapter_config.json and the rank logs. Resumes an interrupted run."""

import json

from lorapipe import cli
from lorapipe.finetune import run_finetune


def main():
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="rendered MindFormers YAML")
    p.add_argument("--state_dir", required=True, help="resumable training state (kept between runs)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--launcher", choices=["msrun", "rank_table"], default="msrun")
    p.add_argument("--workers", type=int, required=True, help="ranks on this node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--master_addr", default=None,
                   help="node rank 0's address (default: this host, or the first host of the Slurm allocation)")
    p.add_argument("--master_port", type=int, default=None)
    p.add_argument("--rank_table", default=None)
    p.add_argument("--visible_devices", default=None)
    p.add_argument("--tokens_per_step", type=int, default=None, help="global batch x sequence length")
    p.add_argument("--adapter_config", required=True, help="JSON written as adapter_config.json")
    p.add_argument("--inputs", nargs="*", default=[], help="files to record in the manifest")
    p.add_argument("--device_target", default="CPU")
    args = p.parse_args()
    run = cli.start(args, {k: getattr(args, k) for k in ("launcher", "workers", "nodes")},
                    device_target=args.device_target, deterministic=args.workers == 1,
                    note=None if args.workers == 1 else
                    "trained on several ranks: checkpoints are not byte-reproducible across runs")
    run_finetune(args.config, args.state_dir, args.out_dir, workers=args.workers, launcher=args.launcher,
                 nodes=args.nodes, master_addr=args.master_addr,
                 master_port=args.master_port, rank_table=args.rank_table,
                 visible_devices=args.visible_devices.split(",") if args.visible_devices else None,
                 tokens_per_step=args.tokens_per_step, adapter=json.loads(args.adapter_config), run=run,
                 inputs=[args.config, *args.inputs])


if __name__ == "__main__":
    cli.main_guard(main)
