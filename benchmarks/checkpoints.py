#!/usr/bin/env python
"""Benchmark: filter_out and fold_lora, streaming vs load-it-all, in one run.

Writes a synthetic training checkpoint (default ~1.2 GB: Baichuan2-shaped fp32 parameters with LoRA
adapters, plus Adam m and v for every parameter and the bookkeeping scalars), then runs each method in
its own process:
  filter  ours  - lorapipe.weights.checkpoints.filter_checkpoint (one tensor at a time)
  filter  naive - mindspore.load_checkpoint, drop entries, mindspore.save_checkpoint (the recipe's way)
  fold    ours  - lorapipe.weights.checkpoints.fold_lora on the filtered checkpoint
  fold    naive - mindspore.load_checkpoint, fold in numpy, mindspore.save_checkpoint

    .venv/bin/python benchmarks/checkpoints.py [--layers 3]
"""

import shutil
import subprocess
import sys

from common import measure, model_args, warm

GENERATE = r"""
import sys
import numpy as np
from lorapipe.formats.msckpt import CheckpointWriter
path, layers, hidden, inter, vocab = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
shapes = {"model.tok_embeddings.embedding_weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
for i in range(layers):
    p = f"model.layers.{i}."
    for w in ("wq", "wk", "wv", "wo"):
        shapes[p + f"attention.{w}.weight"] = (hidden, hidden)
    for w, s in (("w1", (inter, hidden)), ("w2", (hidden, inter)), ("w3", (inter, hidden))):
        shapes[p + f"feed_forward.{w}.weight"] = s
    for w in ("wq", "wk", "wv"):
        shapes[p + f"attention.{w}.mindpet_delta_lora_a"] = (8, hidden)
        shapes[p + f"attention.{w}.mindpet_delta_lora_b"] = (hidden, 8)
with CheckpointWriter(path) as w:
    for prefix in ("", "adam_m.", "adam_v."):
        for name, shape in shapes.items():
            w.add(prefix + name, rng.standard_normal(shape, dtype=np.float32))
    for name in ("global_step", "epoch_num", "step_num", "global_batch_size"):
        w.add(name, np.array([1], np.int32))
    w.add("loss_scale", np.array([1.0], np.float32))
print(max(int(np.prod(s)) * 4 for s in shapes.values()))
"""

OURS_FILTER = "import sys; from lorapipe.weights.checkpoints import filter_checkpoint as f; f(sys.argv[1], sys.argv[2])"
OURS_FOLD = "import sys; from lorapipe.weights.checkpoints import fold_lora as f; f(sys.argv[1], sys.argv[2], 16, 8)"
NAIVE_FILTER = r"""
import sys, mindspore as ms
from lorapipe.weights.checkpoints import is_model_parameter
params = ms.load_checkpoint(sys.argv[1])                                  # everything in memory
ms.save_checkpoint([{"name": n, "data": p} for n, p in params.items() if is_model_parameter(n)], sys.argv[2])
"""
NAIVE_FOLD = r"""
import sys, numpy as np, mindspore as ms
params = {n: p.asnumpy() for n, p in ms.load_checkpoint(sys.argv[1]).items()}  # everything in memory
for n in [n for n in params if n.endswith(".mindpet_delta_lora_a")]:
    cell = n[: -len(".mindpet_delta_lora_a")]
    a, b = params.pop(n), params.pop(cell + ".mindpet_delta_lora_b")
    params[cell + ".weight"] = params[cell + ".weight"] + b @ a * 16 / 8
ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in params.items()], sys.argv[2])
"""


def main():
    args = model_args(__doc__, "/tmp/lorapipe-bench-checkpoints")
    py, train = sys.executable, args.workdir / "train.ckpt"
    largest = int(subprocess.check_output([py, "-c", GENERATE, str(train), str(args.layers), str(args.hidden),
                                           str(args.intermediate), str(args.vocab)]))
    filtered = args.workdir / "filtered.ckpt"
    results = {}
    for name, code, src, dst in (("filter ours", OURS_FILTER, train, filtered),
                                 ("filter naive", NAIVE_FILTER, train, args.workdir / "naive_filtered.ckpt"),
                                 ("fold ours", OURS_FOLD, filtered, args.workdir / "folded.ckpt"),
                                 ("fold naive", NAIVE_FOLD, filtered, args.workdir / "naive_folded.ckpt")):
        warm(src)
        results[name] = measure([py, "-c", code, str(src), str(dst)])
    sizes = {"filter": train.stat().st_size, "fold": filtered.stat().st_size}
    print(f"training checkpoint {sizes['filter'] / 1e9:.2f} GB (filtered {sizes['fold'] / 1e9:.2f} GB), "
          f"largest tensor {largest / 2**20:.0f} MiB\n")
    print("| step | method | wall s | × naive | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for name, (wall, rss) in results.items():
        step, method = name.split()
        print(f"| {step} | {method} | {wall:.2f} | {wall / results[step + ' naive'][0]:.2f} | {rss:.0f} |")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
