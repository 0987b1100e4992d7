#!/usr/bin/env python
"""Benchmark: streaming HF -> MindSpore conversion vs a plain copy and a load-everything converter.

Generates a scaled synthetic Baichuan2 checkpoint (default ~1.1 GB, fp32), then runs, each in its own
process and all in this one run (page cache warmed first, so all three read from memory):
  copy   - shutil.copyfile of pytorch_model.bin: the disk's limit
  naive  - torch.load everything, convert every tensor, mindspore.save_checkpoint (the recipe's way)
  ours   - lorapipe.weights.convert_hf_to_mindspore (streaming)
  ours + manifest - scripts/convert_weight.py: the same, plus sha256 of input and output for provenance
and prints a markdown table of wall time, peak RSS and MB/s, with ratios against the copy.

    .venv/bin/python benchmarks/convert.py [--layers 3] [--workdir /tmp/lorapipe-bench]
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import measure, model_args, warm

REPO = Path(__file__).resolve().parent.parent

NAIVE = r"""
import sys, numpy as np, torch, mindspore as ms
from lorapipe.baichuan2 import hf_to_mindspore
state = torch.load(sys.argv[1], weights_only=True)          # everything in memory at once
params = []
for name, tensor in state.items():
    for ms_name, part in hf_to_mindspore(name, tensor.numpy()):
        params.append({"name": ms_name, "data": ms.Tensor(np.ascontiguousarray(part))})
ms.save_checkpoint(params, sys.argv[2])
"""


GENERATE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from convert import make_checkpoint
print(make_checkpoint(*sys.argv[2:3], *map(int, sys.argv[3:])))
"""


def make_checkpoint(folder, layers, hidden, intermediate, vocab):
    import torch

    folder = Path(folder)
    config = {"hidden_size": hidden, "intermediate_size": intermediate, "vocab_size": vocab,
              "num_hidden_layers": layers, "num_attention_heads": hidden // 128, "rms_norm_eps": 1e-6}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.W_pack.weight": torch.randn(3 * hidden, hidden),
                      p + "self_attn.o_proj.weight": torch.randn(hidden, hidden),
                      p + "mlp.gate_proj.weight": torch.randn(intermediate, hidden),
                      p + "mlp.down_proj.weight": torch.randn(hidden, intermediate),
                      p + "mlp.up_proj.weight": torch.randn(intermediate, hidden),
                      p + "input_layernorm.weight": torch.ones(hidden),
                      p + "post_attention_layernorm.weight": torch.ones(hidden)})
    state["model.norm.weight"] = torch.ones(hidden)
    state["lm_head.weight"] = torch.randn(vocab, hidden)
    torch.save(state, folder / "pytorch_model.bin")
    return max(t.numel() * 4 for t in state.values())


def main():
    args = model_args(__doc__, "/tmp/lorapipe-bench-convert")
    src = args.workdir / "hf"
    py = sys.executable
    # Generated in a child process: a forked child inherits this process's peak RSS, so this one
    # must stay small for the measurements below to be true.
    largest = int(subprocess.check_output([py, "-c", GENERATE, str(Path(__file__).parent), str(src), str(args.layers),
                                           str(args.hidden), str(args.intermediate), str(args.vocab)]))
    size = (src / "pytorch_model.bin").stat().st_size
    warm(src / "pytorch_model.bin")
    runs = {
        "copy": [py, "-c", "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])",
                 str(src / "pytorch_model.bin"), str(args.workdir / "copy.bin")],
        "naive": [py, "-c", NAIVE, str(src / "pytorch_model.bin"), str(args.workdir / "naive.ckpt")],
        "ours": [py, "-c", "import sys; from lorapipe.weights import convert_hf_to_mindspore as c; "
                 "c(sys.argv[1], sys.argv[2])", str(src), str(args.workdir / "ours.ckpt")],
        "ours + manifest": [py, str(REPO / "scripts/convert_weight.py"), "--torch_ckpt_path", str(src),
                            "--mindspore_ckpt_path", str(args.workdir / "ours" / "rank_0" / "x.ckpt")],
    }
    results = {}
    for name, cmd in runs.items():
        results[name] = measure(cmd)
        for out in (*args.workdir.glob("*.bin"), *args.workdir.glob("*.ckpt")):
            out.unlink()  # keep the page cache for the source, not for earlier outputs
    copy_wall = results["copy"][0]
    print(f"checkpoint: {size / 1e9:.2f} GB, {args.layers} layers, largest tensor {largest / 2**20:.0f} MiB; "
          f"RSS target for ours: 2 x largest + 1.5 GiB = {(2 * largest) / 2**20 + 1536:.0f} MiB\n")
    print("| method | wall s | × copy | MB/s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for name, (wall, rss) in results.items():
        print(f"| {name} | {wall:.2f} | {wall / copy_wall:.2f} | {size / 1e6 / wall:.0f} | {rss:.0f} |")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
