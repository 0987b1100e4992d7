"""preflight: each check on real inputs, and the whole rule for Baichuan2-7B- and 13B-shaped bases (true
widths and vocabulary, 2 layers) with the 910B configs, on this CPU-only machine."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from conftest import REPO, SAMPLE_DATA, render, snakemake, write_config

from lorapipe.config import load_config
from lorapipe.train.checks import check_data, check_rank_table, check_tokenizer
from lorapipe.train.network_checks import check_checkpoint

BAICHUAN2_7B_2_LAYERS = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 4096,
                         "num_hidden_layers": 2, "num_attention_heads": 32, "intermediate_size": 11008,
                         "vocab_size": 125696, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
                         "model_max_length": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


# Baichuan2-13B-Chat's config.json with 2 of its 40 layers: no "position_embedding", hidden_size 5120 (ALiBi).
BAICHUAN2_13B_2_LAYERS = dict(BAICHUAN2_7B_2_LAYERS, hidden_size=5120, num_attention_heads=40, intermediate_size=13696)


def write_7b_shaped_base(folder, tokenizer, config=BAICHUAN2_7B_2_LAYERS):
    """An HF Baichuan2 directory at true 7B (or `config`'s) widths with 2 layers, fp16 (2.1 GB for the 7B),
    streamed to disk."""
    from lorapipe.formats.hf_io import SafetensorsWriter
    from lorapipe.model.baichuan2 import hf_shapes

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    plan = [(name, np.dtype(np.float16), shape) for name, shape in hf_shapes(config).items()]
    row = np.random.default_rng(0).standard_normal(config["hidden_size"] * 4).astype(np.float16) * 0.02
    writer = SafetensorsWriter(folder / "model.safetensors", plan)
    for name, _, shape in plan:
        writer.add(name, np.resize(row, shape))  # random-looking weights, one tensor in memory
    writer.close()


@pytest.mark.slow
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
    # 2 x dp 8, every rank reading every row; sink mode trains int(19 / 2) sinks of 2 steps (training_steps)
    assert checks["data"]["detail"] == "319 rows, global batch 16: 19 steps per epoch, 18 in all"
    # the training step itself at 7B widths, one layer, on the host (issue 35)
    assert checks["trial step"]["status"] == "ok" and "hidden_size 4096, num_heads 32" in checks["trial step"]["detail"]
    assert checks["memory"]["status"] == "ok" and "max_device_memory 59GB" in checks["memory"]["detail"]
    assert checks["tokenizer"]["status"] == "ok"


@pytest.mark.slow
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
    assert checks["data"]["detail"] == "319 rows, global batch 16: 19 steps per epoch, 18 in all"
    assert checks["trial step"]["status"] == "ok" and "hidden_size 5120, num_heads 40" in checks["trial step"]["detail"]
    assert checks["memory"]["status"] == "ok" and "max_device_memory 59GB" in checks["memory"]["detail"]
    assert checks["tokenizer"]["status"] == "ok"


def test_checks_name_what_is_wrong(tmp_path, tiny_base_dir):
    from lorapipe.formats.msckpt import write_checkpoint

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

    from lorapipe.data.pipeline import preprocess_conversations

    preprocess_conversations(SAMPLE_DATA, tiny_base_dir / "tokenizer.model", tmp_path / "d.mindrecord", 16)
    rendered = {"runner_config": {"batch_size": 400, "epochs": 1, "sink_mode": False, "sink_size": 1},
                "parallel_config": {"data_parallel": 1, "pipeline_stage": 1},
                "parallel": {"parallel_mode": 0, "full_batch": False},
                "train_dataset": {"input_columns": ["input_ids", "labels"]}, "model": {"model_config": {}}}
    (data,) = check_data(tmp_path / "d.mindrecord", rendered)
    assert data.status == "fail" and "324 rows give no full batch of train.batch_size 400" in data.detail
    # packed rows with an unpacked YAML (or the other way round): a data.packing edit half rebuilt
    preprocess_conversations(SAMPLE_DATA, tiny_base_dir / "tokenizer.model", tmp_path / "p.mindrecord", 16,
                             packing=True)
    (data,) = check_data(tmp_path / "p.mindrecord", dict(rendered, runner_config=dict(rendered["runner_config"],
                                                                                      batch_size=1)))
    assert data.status == "fail" and "columns ['input_ids', 'labels', 'segment_ids'], the YAML reads ['input_ids', "\
        "'labels'] with model_config.packing False" in data.detail

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
    import lorapipe.model.network as model
    from lorapipe.train.network_checks import build_network, unsharded_ops
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
    from lorapipe.train.mindformers_yaml import write_mindformers_config

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
    from lorapipe.model.architecture import ALIBI, POSITION_EMBEDDING_KEY
    from lorapipe.train.network_checks import device_memory

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


def test_the_parallel_layout_is_checked_against_the_network_before_it_is_built(tiny_base_dir):
    """Issue 27: model_parallel 3 with 4 heads and pipeline_stage 4 with 2 layers stopped preflight with a
    traceback from MindFormers; mp > 1 on CPU is not what lorapipe renders there."""
    from lorapipe.config import load_config
    from lorapipe.train.checks import check_layout

    hf = json.loads((tiny_base_dir / "config.json").read_text())  # hidden 32, 4 heads, ffn 88, 2 layers, vocab 600
    tok = tiny_base_dir / "tokenizer.model"
    real = load_config(REPO / "config" / "baichuan2_7b_910b.yaml")

    def layout(cfg, hf_config=hf, **parallel):
        par = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1, "max_device_memory": None, **parallel}
        rendered = render(cfg, hf_config, tok, seq_length=32, parallel=par)
        return check_layout(rendered["model"]["model_config"], rendered)

    assert layout(real, model_parallel=8).detail == "parallel.model_parallel 8 does not divide the network's num_heads 4"
    assert layout(real, model_parallel=3).status == "fail" and "hidden_size 32" in layout(real, model_parallel=3).detail
    assert layout(real, pipeline_stage=4).detail == ("parallel.pipeline_stage 4 is more than the network's 2 layers: "
                                                     "a stage would hold none")
    vocab = layout(real, dict(hf, vocab_size=601), model_parallel=4)
    assert vocab.status == "warn" and "does not divide vocab_size 601" in vocab.detail
    assert layout(real, model_parallel=4, data_parallel=2).status == "ok"
    cpu = layout(load_config(REPO / "config" / "config.yaml"), model_parallel=2)
    assert cpu.status == "fail" and "lorapipe trains data parallel only on CPU" in cpu.detail


def test_lora_targets_that_match_no_cell_are_refused_with_the_cells_there_are(tmp_path, tiny_base_dir):
    from lorapipe.config import load_config
    from lorapipe.train.mindformers_yaml import write_mindformers_config
    from lorapipe.train.network_checks import (
        build_network_check,
        check_lora,
        network_parameters,
    )

    cfg = load_config(REPO / "config" / "config.yaml")
    hf = json.loads((tiny_base_dir / "config.json").read_text())
    results = {}
    for target in (".*q_proj|.*v_proj", ".*wq|.*wv"):
        cfg["lora"]["target_modules"] = target
        rendered = render(cfg, hf, tiny_base_dir / "tokenizer.model", seq_length=32)
        write_mindformers_config(tmp_path / "mf.yaml", rendered)
        net, failed = build_network_check(tmp_path / "mf.yaml")
        assert failed is None
        results[target] = check_lora(network_parameters(net), rendered["model"]["model_config"])
    hf_names = results[".*q_proj|.*v_proj"]
    assert hf_names.status == "fail" and hf_names.detail.startswith(
        "lora.target_modules '.*q_proj|.*v_proj' matches no cell of the network; its 2-D weights are in "
        "attention.wk, attention.wo, attention.wq, attention.wv, feed_forward.w1")
    ok = results[".*wq|.*wv"]
    # 2 layers x (wq, wv) x (A [8, 32] + B [32, 8])
    assert ok.status == "ok" and ok.detail.startswith("4 cells (attention.wq, attention.wv): 2,048 trainable values")


def test_rows_longer_than_the_models_positions_are_refused_unless_allowed():
    from lorapipe.train.checks import check_positions

    refused = check_positions({"seq_length": 600}, {"max_position_embeddings": 512}, allow_longer=False)
    assert refused.status == "fail" and refused.detail.startswith(
        "data.seq_length 600 is more than the base model's 512 positions (config.json max_position_embeddings)")
    assert "data.allow_seq_length_over_max_positions: true" in refused.detail
    assert check_positions({"seq_length": 600}, {"max_position_embeddings": 512}, allow_longer=True).status == "warn"
    # Baichuan2's config.json names model_max_length too, and it is the one its tokenizer and training used
    assert check_positions({"seq_length": 4096}, {"max_position_embeddings": 8192, "model_max_length": 4096},
                           allow_longer=False).status == "ok"


def test_odd_schedules_warn_and_the_rank_table_launcher_on_cpu_fails():
    from lorapipe.train.checks import check_devices, check_schedule

    def rendered(warmup_ratio=0.05, learning_rate=3e-3, save=20):
        return {"lr_schedule": {"warmup_ratio": warmup_ratio, "learning_rate": learning_rate},
                "callbacks": [{"type": "CheckpointMonitor", "save_checkpoint_steps": save}]}

    assert check_schedule(rendered(), 108).status == "ok"
    assert "warmup_ratio 0.05 of 10 steps is no warmup step" in check_schedule(rendered(), 10).detail
    assert "the rate rises for 54 of 108 steps" in check_schedule(rendered(warmup_ratio=0.5), 108).detail
    assert "learning_rate 10.0" in check_schedule(rendered(learning_rate=10.0), 108).detail
    late = check_schedule(rendered(save=500), 108)
    assert late.status == "warn" and "save_checkpoint_steps 500 > 108 steps: only the final checkpoint" in late.detail
    cpu = check_devices("CPU", {"launcher": "rank_table", "workers": 2})
    assert cpu.status == "fail" and cpu.detail.startswith("parallel.launcher rank_table: on CPU")


def test_steps_are_counted_as_mindformers_counts_them():
    """Issue 36: preflight counted rows // global batch (105 for the tiny default), the run trained 108. Data
    parallel: each rank's shard is ceil(rows / dp) rows, batched with drop_remainder; semi-auto with
    full_batch: every rank reads every row in global batches; sink mode trains whole sinks (the tiny run's
    loss.tsv is checked against it in tests/test_workflow.py)."""
    from lorapipe.train.checks import training_steps

    def rendered(parallel_mode, full_batch, sink_mode, sink_size=2, dp=2, batch=4, epochs=3, pp=1, micro=1):
        return {"runner_config": {"batch_size": batch, "epochs": epochs, "sink_mode": sink_mode, "sink_size": sink_size},
                "parallel_config": {"data_parallel": dp, "pipeline_stage": pp, "micro_batch_num": micro},
                "parallel": {"parallel_mode": parallel_mode, "full_batch": full_batch}}

    assert training_steps(287, rendered(0, False, False)) == (8, 36, 108)  # the tiny default on CPU
    assert training_steps(288, rendered(0, False, False)) == (8, 36, 108)
    assert training_steps(289, rendered(0, False, False)) == (8, 36, 108)  # 145 rows a shard: 36 batches of 4
    assert training_steps(287, rendered(1, True, True)) == (8, 35, 104)  # Ascend: 35 a epoch, int(52.5) sinks of 2
    assert training_steps(287, rendered(1, True, False)) == (8, 35, 105)
    assert training_steps(287, rendered(1, True, True, pp=2, micro=2)) == (16, 17, 50)
    assert training_steps(3, rendered(0, False, False)) == (8, 0, 0)


def test_the_trial_step_runs_what_preflight_cannot_see(tmp_path, tiny_base_dir):
    """Issue 35: a head dimension RoPE cannot rotate (hidden 66, 2 heads) passed every check and stopped both
    ranks inside MindSpore's RoPE. The heads check names it; the trial step, one forward and backward step
    at the run's widths on a real batch, fails on it too, and on a MindRecord of another seq_length, in one
    line each; on the tiny default it passes."""
    from lorapipe.data.pipeline import preprocess_conversations
    from lorapipe.train.checks import check_heads
    from lorapipe.train.trial_step import check_trial_step

    hf_config = json.loads((tiny_base_dir / "config.json").read_text())
    tokenizer = tiny_base_dir / "tokenizer.model"
    cfg = load_config(REPO / "config" / "config.yaml")
    preprocess_conversations(SAMPLE_DATA, tokenizer, tmp_path / "d64.mindrecord", 64)
    good = render(cfg, hf_config, tokenizer)
    ok = check_trial_step(good, tmp_path / "d64.mindrecord")
    h, heads, ffn = (hf_config[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size"))
    assert ok.status == "ok" and f"hidden_size {h}, num_heads {heads}, intermediate_size {ffn}, seq_length 64, batch " \
        f"{cfg['train']['batch_size']}" in ok.detail
    odd = render(cfg, dict(hf_config, hidden_size=66, num_attention_heads=2), tokenizer)
    heads = check_heads(odd["model"]["model_config"])
    assert heads.status == "fail" and "head dimension of 33, which RoPE cannot rotate" in heads.detail
    failed = check_trial_step(odd, tmp_path / "d64.mindrecord")
    assert failed.status == "fail" and "hidden_size 66, num_heads 2" in failed.detail and "\n" not in failed.detail
    assert check_heads(render(cfg, dict(hf_config, hidden_size=66, num_attention_heads=2, position_embedding="ALIBI"),
                              tokenizer)["model"]["model_config"]).status == "ok"  # ALiBi rotates nothing
    preprocess_conversations(SAMPLE_DATA, tokenizer, tmp_path / "d48.mindrecord", 48)
    other = check_trial_step(good, tmp_path / "d48.mindrecord")
    assert other.status == "fail" and "seq_length 64" in other.detail


def test_the_launchers_network_settings_are_checked_on_this_host():
    """Issue 35, beyond the case: a master address of another host, or a master port something holds, made
    msrun's ranks wait for a scheduler until the cluster timeout; preflight names them first."""
    import socket

    from lorapipe.train.checks import check_launcher

    one = {"launcher": "msrun", "nodes": 1, "master_addr": None, "master_port": None}
    assert check_launcher(one).status == "ok"
    assert check_launcher(dict(one, master_addr="127.0.0.1")).status == "ok"
    elsewhere = check_launcher(dict(one, master_addr="192.0.2.1"))  # TEST-NET-1: no host has it
    assert elsewhere.status == "fail" and "parallel.master_addr 192.0.2.1" in elsewhere.detail
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        busy = check_launcher(dict(one, master_port=port))
    assert busy.status == "fail" and f"parallel.master_port {port} cannot be bound" in busy.detail
    assert check_launcher(dict(one, nodes=2, master_addr="192.0.2.1")).status == "skipped"
