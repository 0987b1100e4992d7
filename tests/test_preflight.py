"""preflight: each check on real inputs, and the whole rule for Baichuan2-7B- and 13B-shaped bases (true
widths and vocabulary, 2 layers) with the 910B configs, on this CPU-only machine."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import yaml

from conftest import REPO, SAMPLE_DATA, render, snakemake, write_config
from lorapipe.preflight import check_checkpoint, check_data, check_rank_table, check_tokenizer

BAICHUAN2_7B_2_LAYERS = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 4096,
                         "num_hidden_layers": 2, "num_attention_heads": 32, "intermediate_size": 11008,
                         "vocab_size": 125696, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
                         "model_max_length": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


# Baichuan2-13B-Chat's config.json with 2 of its 40 layers: no "position_embedding", hidden_size 5120 (ALiBi).
BAICHUAN2_13B_2_LAYERS = dict(BAICHUAN2_7B_2_LAYERS, hidden_size=5120, num_attention_heads=40, intermediate_size=13696)


def write_7b_shaped_base(folder, tokenizer, config=BAICHUAN2_7B_2_LAYERS):
    """An HF Baichuan2 directory at true 7B (or `config`'s) widths with 2 layers, fp16 (2.1 GB for the 7B),
    streamed to disk."""
    from lorapipe.baichuan2 import hf_shapes
    from lorapipe.hf_io import SafetensorsWriter

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    plan = [(name, np.dtype(np.float16), shape) for name, shape in hf_shapes(config).items()]
    row = np.random.default_rng(0).standard_normal(config["hidden_size"] * 4).astype(np.float16) * 0.02
    writer = SafetensorsWriter(folder / "model.safetensors", plan)
    for name, _, shape in plan:
        writer.add(name, np.resize(row, shape))  # random-looking weights, one tensor in memory
    writer.close()


def test_preflight_passes_for_a_7b_shaped_base_with_the_910b_config(tmp_path, tiny_base_dir):
    write_7b_shaped_base(tmp_path / "base", tiny_base_dir / "tokenizer.model")
    cfg = yaml.safe_load((REPO / "config" / "baichuan2_7b_910b.yaml").read_text())
    cfg["base_model"].update(path=str(tmp_path / "base"), dtype="keep")
    cfg["data"]["train"] = str(SAMPLE_DATA)
    snakemake(tmp_path, "--cores", "2", "preflight", configfile=write_config(tmp_path / "c.yaml", cfg))
    checks = {c["name"]: c for c in json.loads((tmp_path / "results/baichuan2_7b_910b/preflight.json").read_text())["checks"]}
    assert checks["devices"]["status"] == "skipped" and "no Ascend device" in checks["devices"]["detail"]
    assert checks["checkpoint"]["status"] == "ok" and checks["checkpoint dtype"]["status"] == "ok"
    assert checks["shard strategies"]["status"] == "ok" and "((1, 1),)" in checks["shard strategies"]["detail"]
    assert checks["data"]["detail"] == "319 rows, global batch 16: 19 steps per epoch, 19 in all"  # 2 x dp 8
    assert checks["memory"]["status"] == "ok" and "max_device_memory 59GB" in checks["memory"]["detail"]
    assert checks["tokenizer"]["status"] == "ok"


def test_preflight_passes_for_a_13b_shaped_base_with_the_910b_config(tmp_path, tiny_base_dir):
    """Baichuan2-13B (ALiBi, from hidden_size 5120) under semi-auto parallel, dp 8: the network MindFormers
    builds from the rendered YAML has every op on a parameter sharded, its checkpoint matches."""
    write_7b_shaped_base(tmp_path / "base", tiny_base_dir / "tokenizer.model", BAICHUAN2_13B_2_LAYERS)
    cfg = yaml.safe_load((REPO / "config" / "baichuan2_13b_910b.yaml").read_text())
    cfg["base_model"].update(path=str(tmp_path / "base"), dtype="keep")
    cfg["data"]["train"] = str(SAMPLE_DATA)
    snakemake(tmp_path, "--cores", "2", "preflight", configfile=write_config(tmp_path / "c.yaml", cfg))
    results = tmp_path / "results/baichuan2_13b_910b"
    assert yaml.safe_load((results / "finetune/run_baichuan2_lora.yaml").read_text())["model"]["arch"]["type"] == \
        "Baichuan13BV2ForCausalLM"
    checks = {c["name"]: c for c in json.loads((results / "preflight.json").read_text())["checks"]}
    assert checks["checkpoint"]["status"] == "ok" and checks["checkpoint dtype"]["status"] == "ok"
    assert checks["shard strategies"]["status"] == "ok" and "((1, 1),)" in checks["shard strategies"]["detail"]
    assert checks["data"]["detail"] == "319 rows, global batch 16: 19 steps per epoch, 19 in all"
    assert checks["memory"]["status"] == "ok" and "max_device_memory 59GB" in checks["memory"]["detail"]
    assert checks["tokenizer"]["status"] == "ok"


def test_checks_name_what_is_wrong(tmp_path, tiny_base_dir):
    from lorapipe.msckpt import write_checkpoint

    params = {"lm_head.weight": ((10, 4), "float16"), "model.norm_out.weight": ((4,), "float16"),
              "model.layers.0.attention.wq.mindpet_delta_lora_a": ((1, 4), "float16")}
    write_checkpoint(tmp_path / "c.ckpt", [("lm_head.weight", np.zeros((10, 5), np.float32)),
                                           ("global_step", np.zeros(1, np.int32))])
    checkpoint, dtype = check_checkpoint(params, tmp_path / "c.ckpt", "float16")
    assert checkpoint.status == "fail" and "missing: model.norm_out.weight" in checkpoint.detail
    assert "not in the network: global_step" in checkpoint.detail and "lm_head.weight (10, 5)" in checkpoint.detail
    assert dtype.status == "warn" and "param_init_type is float16" in dtype.detail

    small = {"vocab_size": 100, "user_token_id": 3, "assistant_token_id": 4}
    assert check_tokenizer(tiny_base_dir / "tokenizer.model", small).status == "fail"

    from lorapipe.data import preprocess_conversations

    preprocess_conversations(SAMPLE_DATA, tiny_base_dir / "tokenizer.model", tmp_path / "d.mindrecord", 16)
    rendered = {"runner_config": {"batch_size": 400, "epochs": 1, "sink_mode": False, "sink_size": 1},
                "parallel_config": {"data_parallel": 1}}
    assert "324 rows give no full batch" in check_data(tmp_path / "d.mindrecord", rendered).detail

    (tmp_path / "hccn.conf").write_text("address_0=10.0.0.1\naddress_1=10.0.0.2\n")
    table = {"version": "1.0", "server_count": "1", "status": "completed", "server_list": [{
        "server_id": "1.2.3.4", "device": [{"device_id": "0", "device_ip": "10.0.0.1", "rank_id": "0"},
                                           {"device_id": "1", "device_ip": "10.0.0.9", "rank_id": "1"}]}]}
    (tmp_path / "t.json").write_text(json.dumps(table))
    parallel = {"launcher": "rank_table", "workers": 2, "nodes": 1}
    result = check_rank_table(tmp_path / "t.json", parallel, tmp_path / "hccn.conf")
    assert result.status == "fail" and "device 1: 10.0.0.9 (hccn.conf 10.0.0.2)" in result.detail
    assert check_rank_table(tmp_path / "t.json", dict(parallel, workers=8), tmp_path / "hccn.conf").status == "fail"


UNSHARDED_HEAD = textwrap.dedent("""
    # A NormHead whose L2Normalize has no strategy, as before: the check must name it.
    import sys, yaml
    import lorapipe.model as model
    from lorapipe.preflight import build_network, unsharded_ops
    shard = model.NormHead.shard
    def without_l2(self, strategy):
        shard(self, strategy)
        self.l2_normalize = model.ops.L2Normalize(axis=-1, epsilon=1e-12)
    model.NormHead.shard = without_l2
    net, _ = build_network(sys.argv[1])
    print(unsharded_ops(net))
""")


def test_the_strategy_check_catches_an_op_without_a_strategy(tmp_path, tiny_base_dir):
    from lorapipe.config import load_config
    from lorapipe.finetune import write_mindformers_config

    cfg = load_config(REPO / "config" / "baichuan2_7b_910b.yaml")
    rendered = render(cfg, json.loads((tiny_base_dir / "config.json").read_text()), tiny_base_dir / "tokenizer.model",
                      seq_length=32)
    write_mindformers_config(tmp_path / "mf.yaml", rendered)
    (tmp_path / "probe.py").write_text(UNSHARDED_HEAD)
    proc = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "mf.yaml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "('network.network.lm_head', 'l2_normalize', 'L2Normalize')" in proc.stdout.splitlines()[-1]


def test_the_memory_estimate_counts_the_alibi_bias_of_13b():
    """Baichuan2-13B's mask cell holds the distances ([s, s] fp32), an ALiBi bias per head ([1, heads/mp,
    s, s] in fp32, then in the compute dtype) and the mask plus bias ([batch, heads/mp, s, s]); the 7B
    network has none of it."""
    from lorapipe.preflight import device_memory
    from lorapipe.spec import ALIBI, POSITION_EMBEDDING_KEY

    model_config = {"param_init_type": "float16", "compute_dtype": "float16", "seq_length": 512,
                    "hidden_size": 5120, "num_heads": 40, "vocab_size": 125696, "num_layers": 40}
    rendered = {"parallel_config": {"model_parallel": 2, "pipeline_stage": 1}, "runner_config": {"batch_size": 2},
                "recompute_config": {"recompute": True}}
    params = {"model.tok_embeddings.embedding_weight": ((125696, 5120), "float16")}
    rope = device_memory(model_config, rendered, params)
    alibi = device_memory({**model_config, POSITION_EMBEDDING_KEY: ALIBI}, rendered, params)
    assert "ALiBi bias" not in rope
    assert alibi.pop("ALiBi bias") == 512 * 512 * 4 + 20 * 512 * 512 * (4 + 2 + 2 * 2)  # 20 heads/device: 53 MB
    assert alibi == rope
