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

With --saves (issue 32): what one save point writes per rank, train.checkpoint_params all against trainable,
at Baichuan2-7B widths (hidden 4096, FFN 11008, vocab 125696), fp16 weights, LoRA rank --rank on wq, wk, wv
with fp32 Adam moments (the 910B config), measured with 2 and 4 layers and scaled to 32 (bytes: the layers'
share grows linearly; seconds: the 4-layer time, scaled by bytes): mindspore.save_checkpoint of exactly what a rank saves, each in its own process; and the
base's load at the start of training (mindspore.load_checkpoint).

    .venv/bin/python benchmarks/checkpoints.py --saves [--rank 1]
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
OURS_FOLD = r"""
import json, sys
from pathlib import Path
from lorapipe.weights.checkpoints import fold_lora
adapter = Path(sys.argv[2]).with_name("adapter_config.json")  # the trained run's rank and alpha
adapter.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ".*wq|.*wk|.*wv"}))
fold_lora(sys.argv[1], sys.argv[2], adapter)
"""
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


SAVE = r"""
import os, resource, sys, time
import numpy as np, mindspore as ms
kind, fmt, out, layers, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
hidden, inter, vocab = 4096, 11008, 125696
rng = np.random.default_rng(0)
base = {"model.tok_embeddings.embedding_weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
        "model.norm_out.weight": (hidden,)}
lora = {}
for i in range(layers):
    p = f"model.layers.{i}."
    base.update({p + "attention_norm.weight": (hidden,), p + "ffn_norm.weight": (hidden,)})
    base.update({p + f"attention.{w}.weight": (hidden, hidden) for w in ("wq", "wk", "wv", "wo")})
    base.update({p + "feed_forward.w1.weight": (inter, hidden), p + "feed_forward.w2.weight": (hidden, inter),
                 p + "feed_forward.w3.weight": (inter, hidden)})
    for w in ("wq", "wk", "wv"):
        lora.update({p + f"attention.{w}.mindpet_delta_lora_a": (rank, hidden),
                     p + f"attention.{w}.mindpet_delta_lora_b": (hidden, rank)})
def tensor(shape, dtype):
    return ms.Tensor.from_numpy(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
params = [{"name": n, "data": tensor(s, np.float16)} for n, s in lora.items()]
if kind == "all":
    params += [{"name": n, "data": tensor(s, np.float16)} for n, s in base.items()]
    if len(sys.argv) > 6:  # also write the base alone, for the load measurement
        ms.save_checkpoint([p for p in params if p["name"] in base], sys.argv[6], format=fmt)
params += [{"name": f"{m}.{n}", "data": tensor(s, np.float32)} for m in ("adam_m", "adam_v") for n, s in lora.items()]
params += [{"name": n, "data": ms.Tensor(np.array([1], np.int32))} for n in ("global_step", "epoch_num", "step_num")]
params.append({"name": "loss_scale", "data": ms.Tensor(np.array([1.0], np.float32))})
start = time.perf_counter()
ms.save_checkpoint(params, out, format=fmt)
os.sync()
print(time.perf_counter() - start, os.path.getsize(out), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
LOAD = r"""
import resource, sys, time, mindspore as ms
start = time.perf_counter()
params = ms.load_checkpoint(sys.argv[1], format=sys.argv[1].rsplit(".", 1)[1])
# every byte read, as loading it into a network does (a safetensors load maps the file and reads it lazily)
total = sum(float(p.asnumpy().sum(dtype="float32")) for p in params.values())
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def child(*args):
    """The numbers a child process prints on its last line."""
    return [float(x) for x in subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True,
                                             check=True).stdout.split()[-3:]]


def saves(args):
    """Bytes and seconds of one save point per rank, all against trainable, in each format, scaled to 32
    layers; and the base's load."""
    figures, loads = {}, {}
    for fmt in ("ckpt", "safetensors"):
        for kind in ("all", "trainable"):
            for layers in (2, 4):
                out = args.workdir / f"{kind}_{layers}.{fmt}"
                base = [str(args.workdir / f"base_{layers}.{fmt}")] if kind == "all" else []
                figures[kind, fmt, layers] = child(SAVE, kind, fmt, str(out), str(layers), str(args.rank), *base)
                out.unlink()
        for layers in (2, 4):
            base = args.workdir / f"base_{layers}.{fmt}"
            loads[fmt, layers] = child(LOAD, str(base))[-2:]
            base.unlink()

    def at_32(two, four):  # the layers' share grows linearly
        return two + (four - two) / 2 * 30

    def seconds_at_32(kind, fmt):  # the time of the larger measurement, scaled by bytes
        (_, b2, _), (s4, b4, _) = figures[kind, fmt, 2], figures[kind, fmt, 4]
        return s4 * at_32(b2, b4) / b4

    print(f"Baichuan2-7B widths, fp16 weights, LoRA rank {args.rank} on wq, wk, wv, fp32 Adam moments; one rank's "
          f"save point, measured at 2 and 4 layers, scaled to 32\n")
    print("| checkpoint_params | format | bytes per save (32 layers) | × trainable | save s (32 layers) | "
          "peak RSS MiB (4 layers) |")
    print("|---|---|---|---|---|---|")
    small = at_32(figures["trainable", "ckpt", 2][1], figures["trainable", "ckpt", 4][1])
    for fmt in ("ckpt", "safetensors"):
        for kind in ("all", "trainable"):
            (_, b2, _), (_, b4, rss) = figures[kind, fmt, 2], figures[kind, fmt, 4]
            print(f"| {kind} | {fmt} | {at_32(b2, b4) / 1e6:,.1f} MB | {at_32(b2, b4) / small:,.0f} | "
                  f"{seconds_at_32(kind, fmt):.2f} | {rss:.0f} |")
    print("\n| base load at the start of training | seconds (32 layers) | peak RSS MiB (4 layers) |\n|---|---|---|")
    base_bytes = {layers: figures["all", "ckpt", layers][1] - figures["trainable", "ckpt", layers][1] for layers in (2, 4)}
    for fmt in ("ckpt", "safetensors"):
        scaled = loads[fmt, 4][0] * at_32(base_bytes[2], base_bytes[4]) / base_bytes[4]
        print(f"| mindspore.load_checkpoint, {fmt}, every tensor read | {scaled:.1f} | {loads[fmt, 4][1]:.0f} |")


def main():
    if "--saves" in sys.argv:
        import argparse
        from pathlib import Path

        p = argparse.ArgumentParser(description=__doc__)
        p.add_argument("--saves", action="store_true")
        p.add_argument("--rank", type=int, default=1, help="LoRA rank (the 910B config's: 1)")
        p.add_argument("--workdir", type=Path, default=Path("/tmp/lorapipe-bench-saves"))
        args = p.parse_args()
        shutil.rmtree(args.workdir, ignore_errors=True)
        args.workdir.mkdir(parents=True)
        return saves(args)
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
