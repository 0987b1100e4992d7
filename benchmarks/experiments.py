#!/usr/bin/env python
"""Benchmark: three experiments that differ in LoRA rank, in one DAG, against three separate single runs.

  separate  - three configs (lora.rank 8, 16, 32), each in a workdir of its own, one after the other
  one DAG   - one config whose experiments are r8, r16 and r32 (snakemake all_experiments)
Both with --cores 2 on the same machine in the same run. In the DAG the shared steps (tiny_base, ckpt,
export_llama_base, mindrecord) run once, separately three times: the saving should be their time twice over,
taken from the separate runs' own Snakemake benchmark files.

--conversations N: the data step on N conversations (the sample data repeated under new ids, as
benchmarks/preprocess.py writes them) instead of the sample; both then stop at each run's finetune YAML and
MindRecords (training N conversations on a CPU is not the point).

    .venv/bin/python benchmarks/experiments.py [--conversations 400000]
"""

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
RANKS = {"r8": 8, "r16": 16, "r32": 32}
SHARED = ("tiny_base", "ckpt", "export_llama_base", "mindrecord")


def snakemake(workdir, configfile, *targets):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores",
                    "2", *targets, f"--configfile={configfile}"], check=True, capture_output=True,
                   env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    return time.perf_counter() - start


def seconds(tsv):
    with open(tsv) as f:
        return float(next(csv.DictReader(f, delimiter="\t"))["s"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorapipe-bench-experiments"))
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    base = yaml.safe_load((REPO / "config/config.yaml").read_text())
    base["data"]["train"] = str(REPO / "data/belle_sample.json")
    if args.conversations:
        from preprocess import write_conversations

        base["data"]["train"] = str(args.workdir / "belle.jsonl")
        write_conversations(Path(base["data"]["train"]), args.conversations)
    separate, shared = 0.0, 0.0
    for name, rank in RANKS.items():
        work = args.workdir / name
        work.mkdir()
        cfg = yaml.safe_load(yaml.safe_dump(base)) | {"results": "results/run"}
        cfg["lora"].update(rank=rank, alpha=2 * rank)
        (work / "config.yaml").write_text(yaml.safe_dump(cfg))
        targets = ["mindrecord", "mf_config"] if args.conversations else []
        separate += snakemake(work, work / "config.yaml", *targets)
        shared += sum(seconds(f) for f in (work / "results/run/benchmarks").glob("*.tsv") if f.stem in SHARED)
    per_run_shared = shared / len(RANKS)  # the mean over the three separate runs
    dag = args.workdir / "dag"
    dag.mkdir()
    cfg = yaml.safe_load(yaml.safe_dump(base)) | {"results": "results/run",
                                                 "experiments": {n: {"lora": {"rank": r, "alpha": 2 * r}}
                                                                 for n, r in RANKS.items()}}
    (dag / "config.yaml").write_text(yaml.safe_dump(cfg))
    if args.conversations:
        from lorapipe.config import load_config
        from lorapipe.experiments import experiment_configs

        configs = experiment_configs(load_config(dag / "config.yaml"))
        targets = [f"{c['results']}/finetune/run_baichuan2_lora.yaml" for c in configs.values()] + \
            [f"{c['_shared']['data']}/data/belle_{c['data']['seq_length']}.stats.json" for c in configs.values()]
    else:
        targets = ["all_experiments"]
    one = snakemake(dag, dag / "config.yaml", *targets)
    what = f"{args.conversations:,} conversations, up to mf_config" if args.conversations else "the tiny default, all"
    print(f"three experiments (lora.rank 8, 16, 32), {what}, --cores 2\n")
    print("| | wall s |\n|---|---|")
    print(f"| three separate runs | {separate:.1f} |\n| one DAG | {one:.1f} |\n| saving | {separate - one:.1f} |")
    print(f"| shared steps of one separate run (tiny_base, ckpt, export_llama_base, mindrecord), twice | "
          f"{2 * per_run_shared:.1f} |")
    print(f"\nsaving / (shared steps x 2) = {(separate - one) / (2 * per_run_shared):.2f}")


if __name__ == "__main__":
    main()
