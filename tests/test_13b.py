"""Baichuan2-13B (ALiBi): choosing the architecture, the MindSpore network against an independent PyTorch
forward written from the public definition, the host decoder, shard strategies, and the whole tiny
13B DAG (config/tiny_13b.yaml)."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, SAMPLE_DATA, render, snakemake, write_config

from lorapipe.config import load_config, run_position_embedding
from lorapipe.errors import ConfigError, InputError
from lorapipe.model.architecture import (
    alibi_slopes,
    mindformers_model_config,
    position_embedding_of,
)

# 13B-shaped: 5 heads (like 13B's 40, not a power of two: the slopes interleave), FFN 2.75 x the width
# (13B: 2.675; 110 also splits over the 5 model-parallel devices of the strategy test).
TINY_13B = dict(seed=1, hidden_size=40, num_hidden_layers=2, num_attention_heads=5, intermediate_size=110,
                max_position_embeddings=256, vocab_size=600, init_std=0.02, position_embedding="alibi")


@pytest.fixture(scope="module")
def base_13b(tmp_path_factory):
    from lorapipe.weights.tiny_base import build_tiny_base

    return build_tiny_base(SAMPLE_DATA, tmp_path_factory.mktemp("tiny_13b") / "base", **TINY_13B)


@pytest.fixture(scope="module")
def model_13b(base_13b, tmp_path_factory):
    """(network, model_config, converted checkpoint) of the tiny ALiBi model, seq_length 256."""
    from lorapipe.infer.loader import load_model
    from lorapipe.weights.convert import convert_hf_to_mindspore

    hf_config = json.loads((base_13b / "config.json").read_text())
    ckpt = convert_hf_to_mindspore(base_13b, tmp_path_factory.mktemp("ckpt") / "rank_0" / "tiny_13b.ckpt")
    model_config = mindformers_model_config(hf_config, 256, position_embedding_type=position_embedding_of(hf_config))
    return load_model(model_config, ckpt), model_config, ckpt


# -- choosing the architecture ------------------------------------------------------------------------

def test_the_architecture_comes_from_config_json():
    assert position_embedding_of({"hidden_size": 4096}) == "rope"  # Baichuan2-7B
    assert position_embedding_of({"hidden_size": 5120}) == "alibi"  # Baichuan2-13B
    assert position_embedding_of({"hidden_size": 64, "position_embedding": "ALIBI"}) == "alibi"  # explicit wins
    assert position_embedding_of({"hidden_size": 5120, "position_embedding": "ROPE"}) == "rope"
    assert position_embedding_of({"hidden_size": 5120}, "rope") == "rope"  # the config key overrides the width rule
    assert position_embedding_of({"hidden_size": 64}, "alibi") == "alibi"
    assert position_embedding_of({"hidden_size": 64, "position_embedding": "alibi"}, "alibi") == "alibi"
    with pytest.raises(ConfigError, match='base_model.position_embedding rope contradicts m/config.json, which says '
                                          '"position_embedding": "ALIBI"'):
        position_embedding_of({"hidden_size": 64, "position_embedding": "ALIBI"}, "rope", "m/config.json")
    with pytest.raises(InputError, match='m/config.json: "position_embedding": \'NTK\': expected "ROPE" or "ALIBI"'):
        position_embedding_of({"position_embedding": "NTK"}, where="m/config.json")


def test_impossible_combinations_are_config_errors(tmp_path):
    cfg = load_config(REPO / "config" / "tiny_13b.yaml")
    assert run_position_embedding(cfg) == "alibi"
    cfg["base_model"]["position_embedding"] = "rope"
    with pytest.raises(ConfigError, match="contradicts tiny_base.position_embedding"):
        run_position_embedding(cfg)
    cfg["base_model"]["position_embedding"] = "auto"
    cfg["train"]["use_flash_attention"] = True
    with pytest.raises(ConfigError, match="train.use_flash_attention: the base model is ALiBi"):
        run_position_embedding(cfg)
    # a user's base model: its config.json decides
    real = load_config(REPO / "config" / "baichuan2_13b_910b.yaml")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 5120}))
    real["base_model"]["path"] = str(tmp_path)
    assert run_position_embedding(real) == "alibi"
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4096}))
    assert run_position_embedding(real) == "rope"
    # and the workflow stops before planning, naming the key
    bad = yaml.safe_load((REPO / "config" / "tiny_13b.yaml").read_text())
    bad["base_model"]["position_embedding"] = "rope"
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "bad.yaml", bad), check=False)
    assert proc.returncode != 0 and "base_model.position_embedding rope contradicts" in proc.stderr + proc.stdout


def test_tiny_base_says_alibi_in_config_json(base_13b, tiny_base_dir):
    assert json.loads((base_13b / "config.json").read_text())["position_embedding"] == "ALIBI"
    assert "position_embedding" not in json.loads((tiny_base_dir / "config.json").read_text())  # the 7B's file


def test_slopes_are_baichuans():
    # powers of two: the ALiBi paper's geometric series 2^(-8i/n)
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    # 40 heads (Baichuan2-13B): 32 geometric, then every other slope of 64; MindFormers' own _get_interleave
    # (mindformers/modules/layers.py) agrees
    from mindformers.modules.layers import _get_interleave

    assert alibi_slopes(40)[:32] == alibi_slopes(32) and alibi_slopes(40)[32:] == alibi_slopes(64)[0:16:2]
    for n in (5, 12, 40):
        assert np.allclose(alibi_slopes(n), _get_interleave(n), rtol=1e-15, atol=0)


# -- the network against an independent forward --------------------------------------------------------

def baichuan2_13b_forward(state, config, ids):
    """Baichuan2-13B's forward (HF modeling_baichuan.py, eval mode), written from the public definition:
    RMSNorm, W_pack attention with the ALiBi mask (-inf above the diagonal, slope_h * (j - max_pos + 1)
    on every row, as _gen_alibi_mask builds it), SwiGLU, NormHead. No padding: the HF model and
    MindFormers mask padded inputs differently."""
    h, n, eps = config["hidden_size"], config["num_attention_heads"], config["rms_norm_eps"]
    d, max_pos = h // n, config["model_max_length"]

    def interleave(heads):
        def power_of_2(m):
            start = 2 ** (-(2 ** -(math.log2(m) - 3)))
            return [start * start ** i for i in range(m)]
        if math.log2(heads).is_integer():
            return power_of_2(heads)
        closest = 2 ** math.floor(math.log2(heads))
        return power_of_2(closest) + interleave(2 * closest)[0::2][:heads - closest]

    def rms_norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    position = torch.arange(max_pos) - max_pos + 1
    alibi = torch.tensor(interleave(n))[:, None, None] * position[None, None, :]
    future = torch.triu(torch.full((max_pos, max_pos), float("-inf")), 1)
    batch, length = ids.shape
    mask = (future[None] + alibi)[:, :length, :length]
    x = state["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms_norm(x, state[p + "input_layernorm.weight"])
        q, k, v = (t.view(batch, length, n, d).transpose(1, 2)
                   for t in (y @ state[p + "self_attn.W_pack.weight"].T).split(h, -1))
        scores = q @ k.transpose(2, 3) / math.sqrt(d) + mask
        probs = torch.max(scores, torch.tensor(torch.finfo(scores.dtype).min)).softmax(-1)
        x = x + (probs @ v).transpose(1, 2).reshape(batch, length, h) @ state[p + "self_attn.o_proj.weight"].T
        y = rms_norm(x, state[p + "post_attention_layernorm.weight"])
        gate, up = y @ state[p + "mlp.gate_proj.weight"].T, y @ state[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ state[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, state["model.norm.weight"])
    return x @ torch.nn.functional.normalize(state["lm_head.weight"], dim=-1).T


def test_logits_match_an_independent_pytorch_alibi_forward(base_13b, model_13b):
    from lorapipe.infer.loader import load_model
    from lorapipe.model.network import Baichuan13BV2ForCausalLM, logits

    net, _, ckpt = model_13b
    assert isinstance(net, Baichuan13BV2ForCausalLM)
    config = json.loads((base_13b / "config.json").read_text())
    state = torch.load(base_13b / "pytorch_model.bin", weights_only=True)
    ids = np.random.default_rng(0).integers(1, config["vocab_size"], size=(2, 48)).astype(np.int32)
    with torch.no_grad():
        want = baichuan2_13b_forward(state, config, torch.from_numpy(ids).long()).numpy()
    got = logits(net, ids)
    assert got.shape == want.shape == (2, 48, config["vocab_size"])
    assert np.abs(got - want).max() <= 1e-4
    # ALiBi matters: the same weights in the RoPE network give other logits
    rope = load_model(mindformers_model_config(config, 256), ckpt)
    assert np.abs(logits(rope, ids) - want).max() > 0.1


def test_kv_cache_decoder_matches_the_alibi_network(base_13b, model_13b):
    """Position by position, pad ids included (masked as keys, with their bias, as the network does), and
    greedy tokens equal to the full-recompute loop's for 128 new tokens."""
    from lorapipe.infer.generate import generate
    from lorapipe.infer.loader import load_weights
    from lorapipe.model.chat_template import chat_ids
    from lorapipe.model.decode import KVCacheDecoder
    from lorapipe.model.network import logits
    from lorapipe.model.tokenizer import ChatTokenizer

    net, model_config, ckpt = model_13b
    tok = ChatTokenizer(base_13b / "tokenizer.model")
    decoder = KVCacheDecoder(load_weights(model_config, ckpt), model_config)
    ids = chat_ids(tok, "What is the capital of France?") + [0, 17, 0, 5]
    want = logits(net, np.array([ids], np.int32))[0]
    got = [decoder.forward(ids[:6])] + [decoder.forward([t]) for t in ids[6:]]
    assert np.abs(np.stack(got) - want[5:]).max() < 1e-5
    prompt = chat_ids(tok, "法国的首都是哪里？")
    new = generate(KVCacheDecoder(load_weights(model_config, ckpt), model_config), prompt, -1, max_new_tokens=128)
    assert len(new) == 128
    full = logits(net, np.array([prompt + new[:-1]], np.int32))[0]
    assert [int(t) for t in full[len(prompt) - 1:].argmax(-1)] == new
    assert generate(net, prompt, -1, max_new_tokens=8) == new[:8]


def test_conversion_and_export_keep_the_13b_layout(base_13b, model_13b, tmp_path):
    from lorapipe.weights.convert import export_hf

    out = export_hf(model_13b[2], base_13b, tmp_path / "hf")
    source = torch.load(base_13b / "pytorch_model.bin", weights_only=True)
    exported = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert list(exported) == list(source) and all(torch.equal(exported[k], source[k]) for k in source)
    assert json.loads((out / "config.json").read_text())["position_embedding"] == "ALIBI"


STRATEGIES = textwrap.dedent("""
    # The 13B network as MindFormers builds it from a semi-auto parallel YAML (dp 2, mp 5: the tiny model's
    # 5 heads split over 5 devices): the strategies of the ALiBi ops and of what touches a parameter.
    import sys
    from lorapipe.train.network_checks import build_network, strategy_of, unsharded_ops
    net, _ = build_network(sys.argv[1])
    print(unsharded_ops(net))
    for cell, attr in (("model.casual_mask", "mul_slopes"), ("model.casual_mask", "add_bias"),
                       ("model.layers.0.attention", "add"), ("model.layers.0.attention", "batch_matmul_q_k"),
                       ("lm_head", "l2_normalize")):
        print(cell, attr, strategy_of(net, cell, attr))
""")


def test_shard_strategies_follow_parallel_config(base_13b, tmp_path):
    from lorapipe.train.mindformers_yaml import write_mindformers_config

    cfg = load_config(REPO / "config" / "baichuan2_13b_910b.yaml")
    rendered = render(cfg, json.loads((base_13b / "config.json").read_text()), base_13b / "tokenizer.model",
                      seq_length=32, parallel={"data_parallel": 2, "model_parallel": 5, "pipeline_stage": 1,
                                               "max_device_memory": "59GB"})
    assert rendered["model"]["arch"]["type"] == "Baichuan13BV2ForCausalLM"
    write_mindformers_config(tmp_path / "mf.yaml", rendered)
    (tmp_path / "probe.py").write_text(STRATEGIES)
    proc = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "mf.yaml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()[-6:]
    assert lines[0] == "[]"  # every op on a parameter has a strategy or follows its input's layout
    assert lines[1:] == ["model.casual_mask mul_slopes ((1, 5, 1, 1), (1, 1, 1, 1))",
                         "model.casual_mask add_bias ((2, 1, 1, 1), (1, 5, 1, 1))",
                         "model.layers.0.attention add ((2, 5, 1, 1), (2, 5, 1, 1))",
                         "model.layers.0.attention batch_matmul_q_k ((2, 5, 1, 1), (2, 5, 1, 1))",
                         "lm_head l2_normalize ((1, 1),)"]


# -- the whole DAG ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_13b_end_to_end(tmp_path):
    """config/tiny_13b.yaml with packed rows (data.packing): every step on CPU, two data-parallel ranks
    through MindFormers' Trainer, the ALiBi bias on the packed rows' block-diagonal mask; the finetune beats
    the base on held-out data; predict and chat decode with ALiBi; no Llama export. (The tiny default's
    end-to-end test in test_workflow.py trains unpacked rows.)"""
    cfg = yaml.safe_load((REPO / "config" / "tiny_13b.yaml").read_text())
    cfg["data"]["train"] = str(SAMPLE_DATA)
    cfg["data"]["packing"] = True
    configfile = write_config(tmp_path / "tiny_13b.yaml", cfg)
    snakemake(tmp_path, "--cores", "2", "evaluate", "predict", "export_hf", configfile=configfile)  # all but report
    results = tmp_path / "results/tiny_13b"
    rendered = yaml.safe_load((results / "finetune/run_baichuan2_lora.yaml").read_text())
    assert rendered["model"]["arch"]["type"] == "Baichuan13BV2ForCausalLM"
    assert rendered["model"]["model_config"]["packing"] is True
    packing = json.loads((results / "data/belle_64.stats.json").read_text())["packing"]
    assert packing["rows"] < packing["rows_unpacked"] / 2
    metrics = json.loads((results / "evaluate/metrics.json").read_text())
    assert metrics["finetuned"]["loss"] < metrics["base"]["loss"] - 1.0
    predictions = [json.loads(line) for line in (results / "predict/predictions.jsonl").read_text().splitlines()]
    assert [(p["index"], p["model"]) for p in predictions] == [(i, m) for i in range(3) for m in ("finetuned", "base")]
    assert json.loads((results / "hf/config.json").read_text())["position_embedding"] == "ALIBI"
    assert not (results / "hf_llama").exists() and not (results / "peft_adapter").exists()
    refused = snakemake(tmp_path, "-n", "export_llama", configfile=configfile, check=False)
    assert refused.returncode != 0 and "export_llama: the base model uses ALiBi (Baichuan2-13B); a plain "\
        "LlamaForCausalLM has rotary position embeddings only" in refused.stdout + refused.stderr
    # chat, on the predict YAML: its first answer is the finetuned model's prediction for the same prompt
    proc = subprocess.run([sys.executable, str(REPO / "scripts/chat.py"), "--config",
                           "results/tiny_13b/predict/run_baichuan2.yaml", "--load_checkpoint",
                           "results/tiny_13b/merged_lora/rank_0/merged_lora.ckpt", "--max_new_tokens", "32"],
                          input=f"{cfg['predict']['prompts'][0]}\n/quit\n", capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"assistant> {predictions[0]['response']}\n" in proc.stdout
