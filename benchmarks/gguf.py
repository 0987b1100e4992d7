#!/usr/bin/env python
"""Benchmark: the GGUF export (lorapipe.exports.gguf) at Baichuan2-7B widths, bf16 in, f16 (and q8_0) out,
against a plain read+write of the same bytes and against GGUFWriter.add_tensor, all in this one run.

Generates a synthetic LoRA-folded MindSpore checkpoint of Baichuan2-7B's widths and vocabulary (hidden
4096, intermediate 11008, 32 heads, vocab 125696; `--layers` of them, default 2: 2.87 GB in bf16, largest
tensor 982 MiB), its config.json and a tokenizer.model (the sample data's 1000-piece model; the export
pads the vocabulary to 125696 as llama.cpp's converter does), warms the page cache, then runs each method
in its own process, `--repeats` rounds over all, `sync` before each, best wall time of each kept:
  read+write f16      - read the checkpoint once, write as many bytes as the f16 GGUF holds
  ours f16            - export_gguf(..., ("f16",))
  add_tensor f16      - the same conversion through GGUFWriter.add_tensor (every array kept to the end)
  read+write f16+q8_0 - read the checkpoint once, write as many bytes as the f16 and q8_0 files hold
  ours f16+q8_0       - export_gguf(..., ("f16", "q8_0")): what the export_gguf rule writes, one pass
  rule (+ manifest)   - scripts/export_gguf.py: the same plus the provenance manifest (sha256 in and out)
and prints a markdown table: wall s, CPU s (user + system, all threads), ratios against the read+write of
the same bytes, peak RSS.

    .venv/bin/python benchmarks/gguf.py [--layers 2] [--repeats 2] [--workdir /tmp/lorapipe-bench-gguf]
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import warm

REPO = Path(__file__).resolve().parent.parent
HIDDEN, INTERMEDIATE, VOCAB, HEADS = 4096, 11008, 125696, 32

GENERATE = r"""
import json, sys
import numpy as np
from pathlib import Path
from lorapipe.model.baichuan2 import network_shapes
from lorapipe.data.conversations import conversation_texts
from lorapipe.formats.msckpt import CheckpointWriter, bfloat16
from lorapipe.weights.tiny_base import hf_config, train_tokenizer
folder, layers, hidden, inter, vocab, heads = Path(sys.argv[1]), *map(int, sys.argv[2:7])
base = folder / "base"
base.mkdir(parents=True)
(base / "config.json").write_text(json.dumps(hf_config(hidden, layers, heads, inter, 4096, vocab)))
(base / "tokenizer.model").write_bytes(train_tokenizer(conversation_texts(Path(sys.argv[7])), 1000))
rng = np.random.default_rng(0)
shapes = network_shapes({"hidden_size": hidden, "intermediate_size": inter, "vocab_size": vocab, "num_layers": layers})
largest = 0
with CheckpointWriter(folder / "merged_lora.ckpt") as w:
    for name, shape in shapes.items():
        if len(shape) == 1:
            array = (1 + 0.1 * rng.standard_normal(shape, np.float32)).astype(bfloat16())
        else:
            array = np.empty(shape, bfloat16())
            step = max(1, (1 << 24) // shape[1])
            for start in range(0, shape[0], step):
                array[start:start + step] = 0.02 * rng.standard_normal((min(step, shape[0] - start), shape[1]), np.float32)
        w.add(name, array)
        largest = max(largest, array.nbytes)
print(largest)
"""

READ_WRITE = r"""
import sys
sizes = [int(s) for s in sys.argv[2:]]
buffer = memoryview(bytearray(16 << 20))
outs = [open(f"{sys.argv[1]}.out{i}", "wb", buffering=0) for i in range(len(sizes))]
left = list(sizes)
with open(sys.argv[1], "rb", buffering=0) as src:
    while any(left):
        n = src.readinto(buffer) or src.seek(0) or src.readinto(buffer)  # wrap round if asked for more than it holds
        for i, out in enumerate(outs):
            k = min(n, left[i])
            out.write(buffer[:k])
            left[i] -= k
for out in outs:
    out.close()
"""

OURS = r"""
import sys
from lorapipe.exports.gguf import export_gguf
export_gguf(sys.argv[1], sys.argv[2], sys.argv[3], "bench", "rope", tuple(sys.argv[4:]))
"""

# The same conversion, but every converted array handed to GGUFWriter.add_tensor: the writer keeps them
# all until write_tensors_to_file (what the issue asks the export not to do).
ADD_TENSOR = r"""
import json, sys
from pathlib import Path
import numpy as np
import gguf
from lorapipe.exports import gguf as g
from lorapipe.formats.gguf import encode, storage_type
from lorapipe.exports.llama import llama_tensors
from lorapipe.model.baichuan2 import norm_head
from lorapipe.formats.msckpt import iter_checkpoint
ckpt, base, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
config = json.loads((base / "config.json").read_text())
plan = g.tensor_plan(ckpt, config)
writer = gguf.GGUFWriter(out / "bench-f16.gguf", g.GGUF_ARCHITECTURE)
g.add_metadata(writer, config, base / "tokenizer.model", "f16", "bench")
for (name, hf, shape), (_, array) in zip(plan, llama_tensors(iter_checkpoint(ckpt), ckpt)):
    if name.endswith(("attn_q.weight", "attn_k.weight")):
        array = g.permute_qk(array, config["num_attention_heads"])
    q = storage_type(name, shape, "f16")
    writer.add_tensor(name, encode(array, q, norm_head if hf == "lm_head.weight" else None).reshape(shape))
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
"""


def measure(cmd, cwd):
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one command in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--heads", type=int, default=HEADS)
    p.add_argument("--repeats", type=int, default=2, help="rounds over the methods; the best of each is kept")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorapipe-bench-gguf"))
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    # Children run in the work folder: `python -c` puts its folder first on sys.path, and in benchmarks/
    # this file would shadow the gguf package.
    py, w = sys.executable, args.workdir
    # Generated in a child process: a forked child inherits this process's peak RSS.
    largest = int(subprocess.check_output([py, "-c", GENERATE, str(w), str(args.layers), str(args.hidden),
                                           str(args.intermediate), str(args.vocab), str(args.heads), str(REPO / "data" / "belle_sample.json")], cwd=w))
    ckpt, base, out = w / "merged_lora.ckpt", w / "base", w / "out"
    size = ckpt.stat().st_size
    warm(ckpt)
    # The output sizes, for the read+write baselines: from one export up front (not timed).
    subprocess.run([py, "-c", OURS, str(ckpt), str(base), str(out), "f16", "q8_0"], check=True, capture_output=True, cwd=w)
    f16, q8 = ((out / f"bench-{t}.gguf").stat().st_size for t in ("f16", "q8_0"))
    shutil.rmtree(out)
    runs = {
        "read+write f16": ([py, "-c", READ_WRITE, str(ckpt), str(f16)], f16),
        "ours f16": ([py, "-c", OURS, str(ckpt), str(base), str(out), "f16"], f16),
        "add_tensor f16": ([py, "-c", ADD_TENSOR, str(ckpt), str(base), str(out)], f16),
        "read+write f16+q8_0": ([py, "-c", READ_WRITE, str(ckpt), str(f16), str(q8)], f16 + q8),
        "ours f16+q8_0": ([py, "-c", OURS, str(ckpt), str(base), str(out), "f16", "q8_0"], f16 + q8),
        "rule (+ manifest)": ([py, str(REPO / "scripts/export_gguf.py"), "--mindspore_ckpt_path", str(ckpt),
                               "--base_model_dir", str(base), "--out_dir", str(out), "--name", "bench"], f16 + q8),
    }
    results = {}
    for _ in range(args.repeats):  # rounds over all methods: a busy machine slows them alike; best of each
        for name, (cmd, _) in runs.items():
            out.mkdir(exist_ok=True)
            os.sync()  # no dirty pages of the previous method still being written back
            wall, cpu, rss = measure(cmd, w)
            best = results.get(name, (wall, cpu, rss))
            results[name] = (min(wall, best[0]), min(cpu, best[1]), max(rss, best[2]))
            shutil.rmtree(out)
            for f in w.glob("*.out*"):
                f.unlink()
    print(f"checkpoint: {size / 1e9:.2f} GB bf16, {args.layers} layers of hidden {args.hidden}, intermediate "
          f"{args.intermediate}, vocab {args.vocab}, largest tensor "
          f"{largest / 2**20:.0f} MiB; f16 GGUF {f16 / 1e9:.2f} GB, q8_0 GGUF {q8 / 1e9:.2f} GB\n")
    print("| method | wall s | CPU s | × read+write (wall) | written MB/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, (wall, cpu, rss) in results.items():
        floor = results["read+write f16" if "q8_0" not in name and "manifest" not in name else "read+write f16+q8_0"][0]
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {wall / floor:.2f} | {runs[name][1] / 1e6 / wall:.0f} | {rss:.0f} |")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
