#!/usr/bin/env python
"""Benchmark: greedy decoding on the host, tokens/s at 32 and 256 new tokens, in one run.

Builds the tiny default model (hidden 64, 2 layers, 4 heads, FFN 176, vocab 1000, 512 positions) in a
work folder, then decodes the same prompt with
  recompute     - the MindSpore network, re-running the whole sequence for every token (no cache)
  kv-cache      - lorapipe.model.decode.KVCacheDecoder (one position's forward per token), what predict uses
  transformers  - LlamaForCausalLM.generate (KV cache) on the same weights in HF format (W_pack split,
                  lm_head rows normalised)
Every decoder runs greedy without stopping at eos, prefill included, best of --repeats. BLAS and torch
use one thread (the measurement is per core). Goals (issue 13): kv-cache >= 5x recompute at 256 tokens,
and within 2x of transformers.

    .venv/bin/python benchmarks/predict.py [--repeats 3]
"""

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("LOCAL_DEFAULT_PATH", "/tmp/lorapipe-bench-predict/mindformers")

DIMS = dict(seed=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176,
            max_position_embeddings=512, vocab_size=1000, init_std=0.02)
NO_EOS = -1


def transformers_reference(base_dir, hf_config):
    import torch
    import transformers

    h = hf_config["hidden_size"]
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=hf_config["vocab_size"], hidden_size=h, intermediate_size=hf_config["intermediate_size"],
        num_hidden_layers=hf_config["num_hidden_layers"], num_attention_heads=hf_config["num_attention_heads"],
        max_position_embeddings=hf_config["max_position_embeddings"], rms_norm_eps=hf_config["rms_norm_eps"],
        rope_theta=10000.0, tie_word_embeddings=False)).eval()
    state = torch.load(base_dir / "pytorch_model.bin", weights_only=True)
    for i in range(hf_config["num_hidden_layers"]):
        q, k, v = state.pop(f"model.layers.{i}.self_attn.W_pack.weight").split(h)
        state.update({f"model.layers.{i}.self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))})
    state["lm_head.weight"] = torch.nn.functional.normalize(state["lm_head.weight"], dim=-1)
    ref.load_state_dict(state, strict=False)
    torch.set_num_threads(1)

    def generate(prompt, n):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    return generate


def best_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorapipe-bench-predict"))
    args = p.parse_args()
    import json

    from lorapipe.infer.generate import generate
    from lorapipe.infer.loader import load_model, load_weights
    from lorapipe.model.architecture import mindformers_model_config
    from lorapipe.model.chat_template import chat_ids
    from lorapipe.model.decode import KVCacheDecoder
    from lorapipe.model.tokenizer import ChatTokenizer
    from lorapipe.weights.convert import convert_hf_to_mindspore
    from lorapipe.weights.tiny_base import build_tiny_base

    base, ckpt = args.workdir / "base", args.workdir / "base.ckpt"
    if not (base / "pytorch_model.bin").exists():
        build_tiny_base(REPO / "data" / "belle_sample.json", base, **DIMS)
    if not ckpt.exists():
        convert_hf_to_mindspore(base, ckpt)
    hf_config = json.loads((base / "config.json").read_text())
    model_config = mindformers_model_config(hf_config, 512)
    tok = ChatTokenizer(base / "tokenizer.model")
    prompt = chat_ids(tok, "What is the capital of France?")
    net = load_model(model_config, ckpt)
    decoder = KVCacheDecoder(load_weights(model_config, ckpt), model_config)
    hf_generate = transformers_reference(base, hf_config)
    decoders = {
        "recompute": lambda n: generate(net, prompt, NO_EOS, max_new_tokens=n),
        "kv-cache": lambda n: generate(decoder, prompt, NO_EOS, max_new_tokens=n),
        "transformers": lambda n: hf_generate(prompt, n),
    }
    rows = {}
    for n in (32, 256):
        for name, run in decoders.items():
            # the recompute loop takes minutes at 256 tokens: once is enough to see its rate
            seconds = best_seconds(lambda: run(n), 1 if name == "recompute" else args.repeats)
            rows[name, n] = n / seconds
            print(f"{name:13s} {n:4d} new tokens: {seconds:8.3f} s, {n / seconds:9.1f} tokens/s", flush=True)
    print("\n| decoder | tokens/s at 32 | tokens/s at 256 | × recompute at 256 | × transformers at 256 |")
    print("|---|---|---|---|---|")
    for name in decoders:
        print(f"| {name} | {rows[name, 32]:.1f} | {rows[name, 256]:.1f} | "
              f"{rows[name, 256] / rows['recompute', 256]:.1f} | {rows[name, 256] / rows['transformers', 256]:.2f} |")


if __name__ == "__main__":
    main()
