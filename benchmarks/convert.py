#!/usr/bin/env python
"""Benchmark: streaming HF -> MindSpore conversion vs a plain copy and a load-everything converter.

Generates a synthetic Baichuan2 checkpoint (default ~1.1 GB fp32; `--true-7b` for Baichuan2-7B widths,
2 layers, bf16, 2.87 GB) as pytorch_model.bin and model.safetensors, then runs, each in its own process
and all in this one run (page cache warmed first, so all read from memory):
  copy            - cp --reflink=never of pytorch_model.bin (in-kernel copy_file_range: no user-space pass)
  read+write      - read into a buffer and write it out, 16 MiB at a time: the floor for any converter
  naive           - torch.load everything, convert, mindspore.save_checkpoint (the recipe's way)
  ours            - lorapipe.weights.convert.convert_hf_to_mindspore (streaming, hand-written readers)
  torch mmap      - torch.load(mmap=True, weights_only=True), then the same streaming writer
  ours (st)       - ours, from model.safetensors
  safe_open (st)  - safetensors.safe_open, then the same streaming writer
  ours + manifest - scripts/convert_weight.py: ours plus the sha256 of input and output for provenance
  ours -> st      - ours, writing the base as .safetensors (checkpoint.format: safetensors)
and prints a markdown table of wall time, peak RSS and MB/s, with ratios against the copy.

    .venv/bin/python benchmarks/convert.py [--layers 3] [--true-7b] [--workdir /tmp/lorapipe-bench]
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import measure, model_args, warm

REPO = Path(__file__).resolve().parent.parent

NAIVE = r"""
import sys, numpy as np, torch, mindspore as ms
from lorapipe.model.baichuan2 import hf_to_mindspore
state = torch.load(sys.argv[1], weights_only=True)          # everything in memory at once
params = []
for name, tensor in state.items():
    tensor = tensor.float() if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    for ms_name, part in hf_to_mindspore(name, tensor.numpy()):
        data = ms.Tensor(np.ascontiguousarray(part))
        params.append({"name": ms_name, "data": data.astype(ms.bfloat16) if state[name].dtype == torch.bfloat16 else data})
ms.save_checkpoint(params, sys.argv[2])
"""


READ_WRITE = r"""
import sys
buffer = memoryview(bytearray(16 << 20))
with open(sys.argv[1], "rb", buffering=0) as src, open(sys.argv[2], "wb", buffering=0) as dst:
    while n := src.readinto(buffer):
        dst.write(buffer[:n])
"""

GENERATE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from convert import make_checkpoint
print(make_checkpoint(sys.argv[2], *map(int, sys.argv[3:7]), sys.argv[7]))
"""

# The same streaming writer fed by the library readers (see lorapipe/formats/hf_io.py for the comparison).
LIBRARY_READER = r"""
import sys
from lorapipe.model.baichuan2 import hf_to_mindspore
from lorapipe.formats.msckpt import CheckpointWriter, bfloat16
src, dst, reader = sys.argv[1:4]


def numpy_of(t):  # numpy has no bfloat16 of its own: view its bytes as MindSpore's
    import torch
    return t.view(torch.int16).numpy().view(bfloat16()) if t.dtype == torch.bfloat16 else t.numpy()


if reader == "torch":
    import torch
    state = torch.load(src, mmap=True, weights_only=True)
    tensors = ((name, numpy_of(t)) for name, t in state.items())
else:
    from safetensors import safe_open
    f = safe_open(src, framework="pt")
    tensors = ((name, numpy_of(f.get_tensor(name))) for name in f.keys())
with CheckpointWriter(dst) as w:
    for name, array in tensors:
        for ms_name, part in hf_to_mindspore(name, array):
            w.add(ms_name, part)
"""


def make_checkpoint(folder, layers, hidden, intermediate, vocab, dtype="fp32"):
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    config = {"hidden_size": hidden, "intermediate_size": intermediate, "vocab_size": vocab,
              "num_hidden_layers": layers, "num_attention_heads": hidden // 128, "rms_norm_eps": 1e-6}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    def randn(*shape):
        return torch.randn(*shape).to(torch_dtype)

    state = {"model.embed_tokens.weight": randn(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.W_pack.weight": randn(3 * hidden, hidden),
                      p + "self_attn.o_proj.weight": randn(hidden, hidden),
                      p + "mlp.gate_proj.weight": randn(intermediate, hidden),
                      p + "mlp.down_proj.weight": randn(hidden, intermediate),
                      p + "mlp.up_proj.weight": randn(intermediate, hidden),
                      p + "input_layernorm.weight": torch.ones(hidden, dtype=torch_dtype),
                      p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch_dtype)})
    state["model.norm.weight"] = torch.ones(hidden, dtype=torch_dtype)
    state["lm_head.weight"] = randn(vocab, hidden)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "st").mkdir(exist_ok=True)
    (folder / "st" / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "st" / "model.safetensors")
    return max(t.numel() * t.element_size() for t in state.values())


def main():
    args = model_args(__doc__, "/tmp/lorapipe-bench-convert")
    dtype = "bf16" if args.true_7b else "fp32"  # the 7B is published in bf16: 2.87 GB at 2 layers
    src = args.workdir / "hf"
    py = sys.executable
    # Generated in a child process: a forked child inherits this process's peak RSS, so this one
    # must stay small for the measurements below to be true.
    largest = int(subprocess.check_output([py, "-c", GENERATE, str(Path(__file__).parent), str(src), str(args.layers),
                                           str(args.hidden), str(args.intermediate), str(args.vocab), dtype]))
    size = (src / "pytorch_model.bin").stat().st_size
    warm(src / "pytorch_model.bin")
    warm(src / "st" / "model.safetensors")
    ours = "import sys; from lorapipe.weights.convert import convert_hf_to_mindspore as c; c(sys.argv[1], sys.argv[2])"
    runs = {
        "copy": ["cp", "--reflink=never", str(src / "pytorch_model.bin"), str(args.workdir / "copy.bin")],
        "read+write": [py, "-c", READ_WRITE, str(src / "pytorch_model.bin"), str(args.workdir / "rw.bin")],
        "naive": [py, "-c", NAIVE, str(src / "pytorch_model.bin"), str(args.workdir / "naive.ckpt")],
        "ours": [py, "-c", ours, str(src), str(args.workdir / "ours.ckpt")],
        "torch mmap": [py, "-c", LIBRARY_READER, str(src / "pytorch_model.bin"), str(args.workdir / "t.ckpt"),
                       "torch"],
        "ours (st)": [py, "-c", ours, str(src / "st"), str(args.workdir / "st.ckpt")],
        "safe_open (st)": [py, "-c", LIBRARY_READER, str(src / "st" / "model.safetensors"),
                           str(args.workdir / "so.ckpt"), "safetensors"],
        "ours + manifest": [py, str(REPO / "scripts/convert_weight.py"), "--torch_ckpt_path", str(src),
                            "--mindspore_ckpt_path", str(args.workdir / "ours" / "rank_0" / "x.ckpt")],
        "ours -> st": [py, "-c", ours, str(src), str(args.workdir / "ours.safetensors")],
    }
    results = {}
    for _ in range(args.repeats):  # rounds over all methods: a busy machine slows them alike; best of each
        for name, cmd in runs.items():
            if name == "naive" and name in results:
                continue  # once is enough to see it is an order of magnitude off
            os.sync()  # start every method with no dirty pages of the previous one still being written back
            wall, rss = measure(cmd)
            best = results.get(name, (wall, rss))
            results[name] = (min(wall, best[0]), max(rss, best[1]))
            for out in (*args.workdir.glob("*.bin"), *args.workdir.glob("*.ckpt"), *args.workdir.glob("*.safetensors"),
                        *args.workdir.glob("ours/*/*")):
                out.unlink()  # keep the page cache for the source, not for earlier outputs
    copy_wall = results["copy"][0]
    print(f"checkpoint: {size / 1e9:.2f} GB, {args.layers} layers, largest tensor {largest / 2**20:.0f} MiB; "
          f"RSS target for ours: 2 x largest + 1.5 GiB = {(2 * largest) / 2**20 + 1536:.0f} MiB\n")
    floor = results["read+write"][0]
    print("| method | wall s | × copy | × read+write | MB/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, (wall, rss) in results.items():
        print(f"| {name} | {wall:.2f} | {wall / copy_wall:.2f} | {wall / floor:.2f} | {size / 1e6 / wall:.0f} | "
              f"{rss:.0f} |")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
