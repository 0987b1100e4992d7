#!/usr/bin/env python
"""Packed against unpacked training (issue 25), in one run: the tiny default (its tiny Baichuan2 and
tokenizer, data/belle_sample.json, two data-parallel CPU ranks) finetuned through the workflow with
data.packing false and true, at seq 512 (the recipe's) and seq 64 (the tiny default's).

Per setting it reports rows per epoch, the padding fraction of the rows, the finetune's wall time per epoch
and the real (non-padding) tokens per second. Fair comparison: the same conversations, batch size
(train.batch_size rows per rank) and learning rate; each run is long enough to time (at least --min-steps
steps: the epochs are set per setting, so packed runs more epochs); the time per step is the median of
rank 0's step times after the first (the first includes the graph compile); an epoch's time is steps per
epoch x time per step, and real tokens per second = the real tokens of an epoch's trained rows / that time.
Every epoch sees the same real tokens in both settings (but for drop_remainder's last partial batch), so
equal epochs mean equal real tokens seen.

    .venv/bin/python benchmarks/packing.py [--workdir /tmp/lorapipe-packing] [--seq 512 64] [--min-steps 12]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lorapipe.train.losslog import read_rank_log  # noqa: E402


def run_workflow(workdir, seq_length, packing, epochs, target):
    """Build `target` of the tiny default in `workdir` with these settings; the tiny default's results."""
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg["data"].update(train=str(REPO / "data/belle_sample.json"), seq_length=seq_length, packing=packing)
    cfg["train"]["epochs"] = epochs
    cfg["train"]["save_checkpoint_steps"] = 10_000  # time the steps, not the saving
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           target, "--configfile", str(workdir / "config.yaml")]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{target} (seq {seq_length}, packing {packing}) failed:\n{proc.stderr[-3000:]}")
    return workdir / "results/tiny"


def rows_and_real_tokens(mindrecord, packed):
    import mindspore.dataset as ds

    rows = real = 0
    for row in ds.MindDataset(str(mindrecord), shuffle=False).create_dict_iterator(output_numpy=True):
        rows += 1
        # the model reads seq_length of the seq_length + 1 columns
        real += int(np.count_nonzero(row["segment_ids"][:-1])) if packed else \
            int(np.count_nonzero((row["input_ids"][:-1] != 0) | (row["labels"][:-1] != -100)))
    return rows, real


def measure(workdir, seq_length, packing, min_steps):
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    global_batch = cfg["train"]["batch_size"] * cfg["parallel"]["data_parallel"]
    # rows first (the data step alone), to set the epochs that give min_steps steps; editing
    # train.epochs afterwards reruns no data step
    results = run_workflow(workdir, seq_length, packing, 1, "mindrecord")
    rows, real = rows_and_real_tokens(results / f"data/belle_{seq_length}.mindrecord", packing)
    steps_per_epoch = rows // global_batch
    epochs = -(-min_steps // steps_per_epoch)
    run_workflow(workdir, seq_length, packing, epochs, "finetune")
    log = read_rank_log(next((results / ".finetune_state").glob("*/train_log_rank_0.tsv")))
    step_seconds = statistics.median(b["seconds"] - a["seconds"] for a, b in zip(log[1:], log[2:]))
    trained_rows = steps_per_epoch * global_batch
    real_per_epoch = real * trained_rows / rows
    epoch_seconds = steps_per_epoch * step_seconds
    return {"seq": seq_length, "packing": packing, "rows": rows, "steps_per_epoch": steps_per_epoch,
            "epochs": epochs, "padding": 1 - real / (rows * seq_length), "step_s": step_seconds,
            "epoch_s": epoch_seconds, "real_tokens_per_s": real_per_epoch / epoch_seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorapipe-packing"))
    p.add_argument("--seq", type=int, nargs="+", default=[512, 64])
    p.add_argument("--min-steps", type=int, default=12)
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    print("seq  packing   rows  steps/epoch  epochs  padding  s/step  s/epoch  real tokens/s")
    table = []
    for seq in args.seq:
        for packing in (False, True):
            r = measure(args.workdir / f"seq{seq}-{'packed' if packing else 'unpacked'}", seq, packing,
                        args.min_steps)
            table.append(r)
            print(f"{seq:4d}  {str(packing):7} {r['rows']:6d}  {r['steps_per_epoch']:11d}  {r['epochs']:6d}  "
                  f"{100 * r['padding']:6.1f}%  {r['step_s']:6.3f}  {r['epoch_s']:7.2f}  {r['real_tokens_per_s']:13.0f}",
                  flush=True)
        plain, packed = table[-2], table[-1]
        print(f"seq {seq}: {plain['rows'] / packed['rows']:.1f}x fewer rows, "
              f"{packed['real_tokens_per_s'] / plain['real_tokens_per_s']:.1f}x the real tokens per second", flush=True)


if __name__ == "__main__":
    main()
