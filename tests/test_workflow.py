"""The DAG as Snakemake sees it, and one end-to-end run of the tiny default."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import (
    REPO,
    SAMPLE_DATA,
    default_config,
    make_run_workdir,
    snakemake,
    write_config,
)


def planned_jobs(proc):
    """{rule: count} from a dry run's job stats table."""
    table = proc.stdout.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_dry_run_default_plans_the_recipe(tmp_path, tiny_config):
    proc = snakemake(tmp_path, "-n", configfile=tiny_config)
    assert planned_jobs(proc) == {"tiny_base": 1, "ckpt": 1, "mindrecord": 1, "mf_config": 1, "finetune": 1,
                                  "filter_out": 1, "merged_ckpt": 1, "fold_lora": 1, "export_hf": 1, "predict": 1,
                                  "predict_config": 1, "preflight": 1, "evaluate": 1, "report": 1, "export_llama": 1,
                                  "export_llama_base": 1, "export_peft": 1, "export_gguf": 1, "all": 1}


def test_real_config_uses_the_users_base_model(tmp_path, tiny_config):
    # Any complete HF directory stands in for the Baichuan2-7B-Chat download.
    snakemake(tmp_path, "--cores", "1", "tiny_base", configfile=tiny_config)
    real = yaml.safe_load((REPO / "config" / "baichuan2_7b_910b.yaml").read_text())
    real["base_model"]["path"] = str(tmp_path / "results/tiny/tiny_base")
    real["data"]["train"] = str(SAMPLE_DATA)
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "real.yaml", real))
    assert planned_jobs(proc) == {"ckpt": 1, "mindrecord": 1, "mf_config": 1, "finetune": 1, "filter_out": 1,
                                  "merged_ckpt": 1, "fold_lora": 1, "export_hf": 1, "predict": 1, "evaluate": 1,
                                  "predict_config": 1, "preflight": 1, "report": 1, "export_llama": 1,
                                  "export_llama_base": 1, "export_peft": 1, "export_gguf": 1, "all": 1}


ALL_RULES = {"tiny_base", "ckpt", "mindrecord", "mf_config", "preflight", "finetune", "filter_out", "merged_ckpt", "fold_lora",
             "export_hf", "predict_config", "predict", "evaluate", "report", "export_llama", "export_llama_base",
             "export_peft", "export_gguf", "all"}
AFTER_FINETUNE = {"preflight", "finetune", "filter_out", "merged_ckpt", "fold_lora", "export_hf", "predict", "evaluate",
                  "report", "export_llama", "export_peft", "export_gguf", "all"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The whole tiny default, run once for the end-to-end and rebuild tests."""
    workdir = tmp_path_factory.mktemp("e2e")
    configfile = make_run_workdir(workdir)
    proc = snakemake(workdir, "--cores", "2", configfile=configfile)
    (workdir / "run.out").write_text(proc.stdout + proc.stderr)
    return workdir, configfile


def tiny_config_prompts():
    return default_config()["predict"]["prompts"]


def test_end_to_end_tiny_default(built):
    tmp_path, tiny_config = built
    base = tmp_path / "results/tiny/tiny_base"
    assert (base / "pytorch_model.bin").stat().st_size > 0
    manifest = json.loads((base / "pytorch_model.bin.manifest.json").read_text())
    assert manifest["rule"] == "tiny_base"
    for rule in ("tiny_base", "ckpt", "mindrecord", "mf_config", "preflight", "finetune", "filter_out",
                 "merged_ckpt", "fold_lora", "export_hf", "predict_config", "predict", "evaluate", "report",
                 "export_llama", "export_llama_base", "export_peft", "export_gguf"):
        assert (tmp_path / f"results/tiny/logs/{rule}.log").exists(), rule
        assert (tmp_path / f"results/tiny/benchmarks/{rule}.tsv").exists(), rule
    from lorapipe.formats.msckpt import iter_checkpoint

    base_weights = dict(iter_checkpoint(tmp_path / "results/tiny/ckpt/rank_0/baichuan2_tiny.ckpt"))
    for rank in (0, 1):  # only LoRA trained, and only it saved (issue 32): 12 LoRA matrices and their moments
        trained = dict(iter_checkpoint(tmp_path / f"results/tiny/finetune/checkpoint_network/rank_{rank}/"
                                                  "baichuan2_tiny_lora.ckpt"))
        assert not set(trained) & set(base_weights)
        assert len([k for k in trained if k.endswith(("mindpet_delta_lora_a", "mindpet_delta_lora_b"))
                    and not k.startswith("adam")]) == 12
    merged = dict(iter_checkpoint(tmp_path / "results/tiny/merged_ckpt/rank_0/checkpoint_0.ckpt"))
    assert all(merged[k].tobytes() == v.tobytes() for k, v in base_weights.items())  # every base tensor as it was
    # collected without a copy (issue 32): the state's last checkpoint is a hard link
    results = tmp_path / "results/tiny"
    last = next(results.glob(".finetune_state/*/output/checkpoint/rank_0/*-3_36.ckpt"))
    assert (results / "finetune/checkpoint_network/rank_0/baichuan2_tiny_lora.ckpt").stat().st_ino == last.stat().st_ino
    metrics = json.loads((tmp_path / "results/tiny/evaluate/metrics.json").read_text())
    assert metrics["finetuned"]["loss"] < metrics["base"]["loss"] - 0.5  # the finetune helped
    # the page a user opens holds its pictures (issue 31): the loss curve and the length histogram
    page = (tmp_path / "results/tiny/report/summary.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2 and "<h2>Training loss</h2>" in page
    # the run ends with where things are and the headline numbers (issue 31)
    summary = (tmp_path / "run.out").read_text().split("lorapipe: done; in results/tiny/:")[1]
    for path in ("merged_lora/rank_0/merged_lora.ckpt", "hf_llama", "gguf", "report/summary.html"):
        assert f"\n  {path} " in summary, path
    assert f"held-out loss {metrics['base']['loss']:.3f} (base) -> {metrics['finetuned']['loss']:.3f} (finetuned)" in summary
    predictions = [json.loads(line) for line in
                   (tmp_path / "results/tiny/predict/predictions.jsonl").read_text().splitlines()]
    assert [(p["index"], p["model"]) for p in predictions] == [(i, m) for i in range(3) for m in ("finetuned", "base")]
    assert all(p["prompt_tokens"] > 0 and p["new_tokens"] >= 0 and "seconds" not in p for p in predictions)
    # The recipe predicts from merged_ckpt (LoRA unfolded): folded on load with the trained run's scale,
    # the answers are merged_lora's (the `finetuned` rows), not the base model's.
    recipe = subprocess.run([sys.executable, str(REPO / "scripts/run_baichuan2.py"), "--config",
                             "results/tiny/predict/run_baichuan2.yaml", "--run_mode", "predict", "--use_parallel",
                             "False", "--load_checkpoint", "results/tiny/merged_ckpt/rank_0/checkpoint_0.ckpt",
                             "--auto_trans_ckpt", "False", "--adapter_config", "results/tiny/finetune/adapter_config.json",
                             "--predict_data", *tiny_config_prompts()], cwd=tmp_path, capture_output=True, text=True)
    assert recipe.returncode == 0, recipe.stderr[-2000:]
    from_merged_ckpt = [json.loads(line)["response"] for line in recipe.stdout.splitlines()]
    assert from_merged_ckpt == [p["response"] for p in predictions if p["model"] == "finetuned"]
    assert from_merged_ckpt != [p["response"] for p in predictions if p["model"] == "base"]
    report = snakemake(tmp_path, "--report", "report.html", configfile=tiny_config)
    assert (tmp_path / "report.html").stat().st_size > 10000, report.stderr
    # Nothing is stale after a complete run.
    assert "Nothing to be done" in snakemake(tmp_path, "-n", configfile=tiny_config).stdout
    # Provenance: the merged checkpoint's chain back to the sources, from the manifests alone.
    chain = subprocess.run([sys.executable, str(REPO / "scripts/provenance.py"), "--verify",
                            "results/tiny/merged_ckpt/rank_0/checkpoint_0.ckpt"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert chain.returncode == 0, chain.stdout + chain.stderr
    # a step's first line is "<rule>  [<manifest>]" (its params line may hold lists: data.drop)
    steps = [words[0] for words in map(str.split, chain.stdout.splitlines())
             if len(words) == 2 and words[1].startswith("[")]
    assert steps == ["merged_ckpt", "filter_out", "finetune", "mf_config", "tiny_base", "ckpt", "mindrecord"]
    assert "belle_sample.json  (source)" in chain.stdout and "verify: 0 problem(s) in 7 step(s)" in chain.stdout
    checks = json.loads((tmp_path / "results/tiny/preflight.json").read_text())["checks"]
    preflight = {c["name"]: c["status"] for c in checks}
    assert preflight == {"devices": "ok", "launcher": "ok", "rank table": "skipped", "heads": "ok", "parallel layout": "ok",
                         "checkpoint": "ok", "checkpoint dtype": "ok", "lora": "ok", "checkpoints": "ok", "tokenizer": "ok",
                         "sequence length": "ok", "data": "ok", "schedule": "ok", "memory": "ok",
                         "shard strategies": "skipped", "trial step": "ok"}
    # the steps preflight counts are the steps the run trained (issue 36: it said 105, the run trained 108)
    steps = len((tmp_path / "results/tiny/finetune/loss.tsv").read_text().splitlines()) - 1
    data = next(c["detail"] for c in checks if c["name"] == "data")
    assert steps == 108 and data.endswith(f": 36 steps per epoch, {steps} in all"), data


RECORDED = REPO / "tests/data/tiny_default.sha256"


def test_the_tiny_default_gives_the_recorded_bytes(built):
    """Every artifact of the tiny default is byte-identical to the list recorded before the package moved
    into stage folders (issue 33): the moves changed no behaviour."""
    results = built[0] / "results/tiny"
    recorded = [line.split() for line in RECORDED.read_text().splitlines() if not line.startswith("#")]
    changed = []
    for digest, name in recorded:
        data = (results / name).read_bytes()
        if name == "finetune/loss.tsv":  # step, loss, lr: tokens_per_s is a timing
            data = b"".join(b"\t".join(line.split(b"\t")[:3]) + b"\n" for line in data.splitlines())
        if hashlib.sha256(data).hexdigest() != digest:
            changed.append(name)
    assert not changed, f"artifacts differ from {RECORDED.name}: {changed}"


@pytest.mark.parametrize("key, value, reruns", [
    ("lora.rank", 4, {"mf_config"} | AFTER_FINETUNE),
    ("train.epochs", 1, {"mf_config"} | AFTER_FINETUNE),
    ("data.seq_length", 48, {"mindrecord", "mf_config"} | AFTER_FINETUNE),
    ("data.heldout_fraction", 0.2, {"mindrecord"} | AFTER_FINETUNE),
    ("data.packing", True, {"mindrecord", "mf_config"} | AFTER_FINETUNE),
    ("base_model.dtype", "fp16", {"ckpt", "export_llama_base"} | AFTER_FINETUNE),
    ("tiny_base.seed", 1, ALL_RULES),
    ("predict.max_new_tokens", 8, {"predict_config", "predict", "report", "all"}),
    ("predict.prompts", ["Hello!"], {"predict", "report", "all"}),
    ("parallel.launcher", "rank_table", {"rank_table"} | AFTER_FINETUNE),
])
def test_a_config_edit_reruns_exactly_what_it_affects(built, key, value, reruns):
    workdir, configfile = built
    cfg = yaml.safe_load(configfile.read_text())
    section, name = key.split(".")
    cfg[section][name] = value
    if key == "parallel.launcher":  # the rank table needs this node's device IPs
        (workdir / "hccn.conf").write_text("address_0=1.1.1.1\naddress_1=1.1.1.2\n")
        cfg["parallel"]["hccn_conf"] = str(workdir / "hccn.conf")
    proc = snakemake(workdir, "-n", configfile=write_config(workdir / "edited.yaml", cfg))
    assert set(planned_jobs(proc)) == reruns


def shuffled(value, rng):
    """The same config with every mapping's keys in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    return value


def test_the_same_config_written_differently_reruns_nothing(built):
    import random

    workdir, configfile = built
    text = yaml.safe_dump(shuffled(yaml.safe_load(configfile.read_text()), random.Random(3)), sort_keys=False,
                          allow_unicode=True)
    # numerically equal spellings, and a path with ./
    text = text.replace("learning_rate: 0.003", "learning_rate: 3e-3").replace("alpha: 16", "alpha: 16.0")
    text = text.replace("data/belle_sample.json", "data/./belle_sample.json")  # pathlib would drop ./
    assert "3e-3" in text and "alpha: 16.0" in text and "/./" in text
    (workdir / "rewritten.yaml").write_text(text)
    assert "Nothing to be done" in snakemake(workdir, "-n", configfile=workdir / "rewritten.yaml").stdout


@pytest.mark.parametrize("path, reruns", [
    ("results/tiny/tiny_base/tokenizer.model", {"mindrecord", "mf_config", "predict_config", "export_llama_base"}
     | AFTER_FINETUNE),
    (REPO / "scripts/export_hf.py", {"export_hf", "all"}),
    (REPO / "scripts/run_baichuan2.py", {"predict", "report", "all"}),  # predict code never reruns finetune
    (REPO / "scripts/fold_lora.py", {"fold_lora", "export_hf", "export_llama", "export_gguf", "predict",
                                     "evaluate", "report", "all"}),
])
def test_an_edited_file_reruns_its_consumers(built, path, reruns):
    workdir, configfile = built
    path = workdir / path
    before, content = path.stat(), path.read_bytes()
    try:  # a real edit: Snakemake compares small files by checksum, so a mere touch reruns nothing
        path.write_bytes(content + b"\n# edited\n")
        assert set(planned_jobs(snakemake(workdir, "-n", configfile=configfile))) == reruns
    finally:
        path.write_bytes(content)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "Nothing to be done" in snakemake(workdir, "-n", configfile=configfile).stdout


def test_a_missing_data_path_stops_the_plan_after_a_complete_run(built, tmp_path):
    """Issue 27: after a complete run, data.train set to a path that does not exist (a typo) gave "Nothing
    to be done", and once tiny_base's outputs were gone, a plan of finetune alone that trained with the old
    rendered YAML. Either way the plan must stop, naming the key."""
    import shutil

    workdir, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "results", copy / "results", symlinks=True)
    cfg = default_config()
    cfg["data"]["train"] = str(tmp_path / "belle_new_dataset.json")
    typo = write_config(tmp_path / "typo.yaml", cfg)
    for _ in ("complete", "tiny_base gone"):
        proc = snakemake(copy, "-n", "finetune", configfile=typo, check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Nothing to be done" not in output and "Job stats" not in output
        assert f"ConfigError: data.train: {tmp_path}/belle_new_dataset.json does not exist" in output
        for made in (copy / "results/tiny/tiny_base").iterdir():  # as Snakemake leaves a failed tiny_base job
            made.unlink()


def record_ends(path):
    """Where each record of a .ckpt file ends (0x0A, a varint length, the record)."""
    data, ends, pos = path.read_bytes(), [], 0
    while pos < len(data) and data[pos] == 0x0A:
        pos, length, shift = pos + 1, 0, 0
        while True:
            byte, pos, shift = data[pos], pos + 1, shift + 7
            length |= (byte & 0x7F) << (shift - 7)
            if byte < 0x80:
                break
        ends.append(pos + length)
        pos += length
    return ends


def damaged_copy(built, tmp_path, cuts):
    """A copy of the finished tiny run whose training was not collected, with rank 0's checkpoints cut:
    `cuts` {file name: "mid-record" | "record boundary"}."""
    import shutil

    workdir, configfile = built
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "results", copy / "results", symlinks=True)
    configfile = make_run_workdir(copy)
    state = next((copy / "results/tiny/.finetune_state").iterdir())
    (state / "complete").unlink()
    for name, cut in cuts.items():
        path = state / "output/checkpoint/rank_0" / name
        ends = record_ends(path)
        size = ends[len(ends) // 2] if cut == "record boundary" else ends[-1] - 100
        os.truncate(path, size)
    return copy, configfile, state


def assert_same_training(run, built):
    """Every LoRA tensor, every optimizer moment and every step's loss as the uninterrupted run's."""
    from lorapipe.formats.msckpt import iter_checkpoint
    from lorapipe.train.losslog import read_loss_tsv

    for rank in (0, 1):
        ckpt = f"results/tiny/finetune/checkpoint_network/rank_{rank}/baichuan2_tiny_lora.ckpt"
        resumed, uninterrupted = (dict(iter_checkpoint(root / ckpt)) for root in (run, built[0]))
        assert resumed.keys() == uninterrupted.keys()
        assert [k for k, v in uninterrupted.items() if resumed[k].tobytes() != v.tobytes()] == []
    losses = [[(r["step"], r["loss"]) for r in read_loss_tsv(root / "results/tiny/finetune/loss.tsv")]
              for root in (run, built[0])]
    assert losses[0] == losses[1] and len(losses[0]) == 108


@pytest.mark.parametrize("cut", ["mid-record", "record boundary"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_resume_is_exact(built, tmp_path, cut):
    """Issue 35: rank 0's newest checkpoint (global step 108 of 108) cut mid-record was refused with no
    remedy; cut at a record boundary it read cleanly, 32 of 62 tensors, and the resume was silently wrong.
    Now it is moved aside, named; the resume starts from step 100, the newest complete on both ranks, named
    to MindFormers explicitly; and the training is the uninterrupted one's, tensor for tensor and loss for
    loss."""
    newest = "baichuan2_tiny_lora_rank_0-3_36.ckpt"
    copy, configfile, state = damaged_copy(built, tmp_path, {newest: cut})
    snakemake(copy, "--cores", "2", "-f", "finetune", configfile=configfile)
    log = (copy / "results/tiny/logs/finetune.log").read_text()
    assert f"{newest} is incomplete" in log and f"moved aside to {newest}.incomplete" in log
    assert ("truncated" in log) == (cut == "mid-record")
    assert "resuming from global step 100, the newest complete on every rank (baichuan2_tiny_lora_rank_0-3_28.ckpt); " \
           "the newest any rank saved is step 108: 8 steps are trained again" in log
    assert (state / "output/checkpoint/rank_0" / f"{newest}.incomplete").is_file()  # kept, not deleted
    assert_same_training(copy, built)


def test_no_complete_step_is_refused_unless_restarting_is_asked_for(built, tmp_path):
    """Every checkpoint of rank 0 damaged: no step is complete on every rank. The rerun refuses with the
    remedy; with resume.restart_if_damaged it trains from step 0, and gives the uninterrupted training."""
    copy, configfile, state = damaged_copy(built, tmp_path, {"baichuan2_tiny_lora_rank_0-3_28.ckpt": "mid-record",
                                                             "baichuan2_tiny_lora_rank_0-3_36.ckpt": "record boundary"})
    refused = snakemake(copy, "--cores", "2", "-f", "finetune", configfile=configfile, check=False)
    log = (copy / "results/tiny/logs/finetune.log").read_text()
    assert refused.returncode != 0
    assert "no step has a complete checkpoint on every rank (rank 0: steps none; rank 1: steps [100, 108])" in log
    assert "set resume.restart_if_damaged: true" in log
    cfg = yaml.safe_load(configfile.read_text())
    cfg["resume"] = {"restart_if_damaged": True}
    snakemake(copy, "--cores", "2", "-f", "finetune", configfile=write_config(copy / "restart.yaml", cfg))
    assert_same_training(copy, built)


def test_rank_table_target(tmp_path):
    (tmp_path / "hccn.conf").write_text("address_0=192.98.0.10\naddress_1=192.98.1.10\n")
    cfg = default_config()
    cfg["parallel"].update(hccn_conf=str(tmp_path / "hccn.conf"), server_ip="10.0.0.1")
    snakemake(tmp_path, "--cores", "1", "rank_table", configfile=write_config(tmp_path / "c.yaml", cfg))
    table = json.loads((tmp_path / "results/tiny/rank_table.json").read_text())
    assert [d["device_ip"] for d in table["server_list"][0]["device"]] == ["192.98.0.10", "192.98.1.10"]
    # server_ip null (the default): the step resolves the host's address. It once got `--server_ip` with no
    # value and stopped in argparse; here it gets as far as the address (a loopback one is refused).
    cfg["parallel"]["server_ip"] = None
    proc = snakemake(tmp_path, "--cores", "1", "--forcerun", "rank_table", "rank_table",
                     configfile=write_config(tmp_path / "c.yaml", cfg), check=False)
    log = (tmp_path / "results/tiny/logs/rank_table.log").read_text()
    assert "expected one argument" not in proc.stderr + log
    assert proc.returncode == 0 or "loopback" in log, log[-2000:]


def test_lint_and_format_are_clean():
    """`snakemake --lint` has nothing to say and snakefmt would change nothing (a step's manifest names its
    rule from its `log:` path, so no shell passes `{rule}`, which the linter does not know)."""
    bin_dir = Path(sys.executable).parent
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "-s", str(REPO / "Snakefile")],
                          capture_output=True, text=True, cwd=REPO)
    blocks = re.split(r"\n(?=Lints for )", lint.stdout + lint.stderr)
    lints = [line for block in blocks if block.startswith("Lints for ")
             for line in block.splitlines() if line.startswith("    * ")]
    assert not lints, lint.stdout + lint.stderr
    assert "Error" not in lint.stdout + lint.stderr
    fmt = subprocess.run([str(bin_dir / "snakefmt"), "--check", str(REPO / "Snakefile"), str(REPO / "rules")],
                         capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_slurm_profile_plans_multi_node_finetune_on_npu_nodes(tmp_path):
    cfg = default_config()
    cfg["device_target"] = "Ascend"
    cfg["parallel"].update(workers=8, nodes=2, data_parallel=16, master_port=29500, visible_devices="0,1,2,3,4,5,6,7")
    proc = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles/slurm"),
                     configfile=write_config(tmp_path / "c.yaml", cfg))
    finetune = proc.stdout.split("rule finetune:")[1].split("\n\n")[0]
    assert "slurm_partition=ascend" in finetune and "npus=8" in finetune
    # the plugin's own resources, generated from parallel.*, never slurm_extra
    for resource in ("nodes=2", "tasks=2", "cpus_per_task=2", "gres=npu:8"):
        assert resource in finetune, resource
    assert "slurm_extra" not in finetune
    assert '"launcher": "msrun"' in finetune and '"nodes": 2' in finetune and '"master_port": 29500' in finetune
    convert = proc.stdout.split("rule ckpt:")[1].split("\n\n")[0]
    assert "slurm_partition=cpu" in convert and "npus=0" in convert


def laptop_910b_config(workdir, tmp_path):
    """(the 910B config as a dict, its base model folder) with a base model of only config.json and
    tokenizer.model (the finished tiny run's), as on a laptop, and the sample data."""
    laptop = tmp_path / "Baichuan2-7B-Chat"
    laptop.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (laptop / name).write_bytes((workdir / "results/tiny/tiny_base" / name).read_bytes())
    real = yaml.safe_load((REPO / "config" / "baichuan2_7b_910b.yaml").read_text())
    real["base_model"]["path"] = str(laptop)
    real["data"]["train"] = str(SAMPLE_DATA)
    return real, laptop


def job_resources(plan):
    """{rule: its resources line} of a dry run's jobs."""
    return {m[1]: m[2] for m in re.finditer(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", plan, re.M)}


def test_the_910b_plan_puts_every_job_where_it_can_run(built, tmp_path):
    """Issue 36: evaluate ran on the host CPU in fp32 whatever the config (28 GB and hours for 7B), and the
    Slurm profile sent evaluate and predict to the cpu partition, where predict's Ascend YAML cannot run.
    The 910B recipe's plan, locally and under profiles/slurm: finetune on the NPUs, predict, evaluate and a
    benchmark task (issue 31) on one NPU each, every other job on CPU with none."""
    workdir, _ = built
    real, laptop = laptop_910b_config(workdir, tmp_path)
    (tmp_path / "mmlu").mkdir()  # (planning checks that the release is there; the job reads it)
    real["evaluate"] = {"tasks": [{"name": "mmlu", "path": str(tmp_path / "mmlu"), "shots": 5}]}
    configfile = write_config(tmp_path / "my_910b.yaml", real)
    on_device = {"finetune": "npu:8", "predict": "npu:1", "evaluate": "npu:1", "eval_task": "npu:1"}
    local = job_resources(snakemake(tmp_path, "-n", configfile=configfile).stdout)
    slurm = job_resources(snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles/slurm"), configfile=configfile).stdout)
    assert set(local) == set(slurm) >= set(on_device) | {"ckpt", "mindrecord", "export_gguf"}
    for rule, resources in slurm.items():
        if rule in on_device:
            assert "slurm_partition=ascend" in resources and f"gres={on_device[rule]}" in resources, (rule, resources)
            assert f"npus={on_device[rule][4:]}" in local[rule], (rule, local[rule])
        else:
            assert "slurm_partition=cpu" in resources and "npus=0" in resources, (rule, resources)
            assert "npus=0" in local[rule] or "npus" not in local[rule], (rule, local[rule])
    predict_yaml = yaml.safe_load(render_predict(real, laptop))
    assert predict_yaml["model"]["model_config"]["compute_dtype"] == "float16"  # the training's, on the device


def render_predict(cfg, base):
    from lorapipe.config import SCHEMA_PATH, canonical, load_yaml
    from lorapipe.train.mindformers_yaml import render_predict_config

    cfg = canonical(cfg, load_yaml(SCHEMA_PATH))
    generation = {k: v for k, v in cfg["predict"].items() if k != "prompts"}
    return yaml.safe_dump(render_predict_config(
        json.loads((base / "config.json").read_text()), tokenizer=base / "tokenizer.model", name="x",
        generation=generation, device_target=cfg["device_target"], position_embedding="rope",
        dtypes={k: cfg["train"][k] for k in ("compute_dtype", "param_init_type")}))


def test_multi_node_rank_table_is_written_per_node_and_merged(tmp_path):
    (tmp_path / "hccn.conf").write_text("".join(f"address_{i}=192.98.{i}.10\n" for i in range(8)))
    cfg = default_config()
    cfg["parallel"].update(workers=8, nodes=2, data_parallel=16, visible_devices="0,1,2,3,4,5,6,7",
                           hccn_conf=str(tmp_path / "hccn.conf"))
    proc = snakemake(tmp_path, "-n", "rank_table", configfile=write_config(tmp_path / "c.yaml", cfg))
    command = proc.stdout.split("rule rank_table:")[1]
    table = "results/tiny/rank_table.json"
    # inside the executor's own job step: --ntasks overrides its SLURM_NTASKS=1, --overlap shares its CPUs
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --overlap bash -c" in command
    assert "nodes=2, tasks=2" in command  # the Slurm job holds both nodes
    assert "--device_num '[0,8)'" in command and f"--output {table}.node\\$SLURM_NODEID.json" in command
    assert f"merge_hccl.py --log results/tiny/logs/rank_table.log {table}.node0.json " \
           f"{table}.node1.json --output {table}" in command


def readme_commands():
    """Every `snakemake ...` and `python scripts/...` command in the bash blocks of the README and the
    pages of docs/ it links to, one string each (continuation lines joined, trailing comments dropped)."""
    import shlex

    text = "\n".join(path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(snakemake [^`]*)`", text)  # inline ones too
    commands = [shlex.split(line, comments=True) for line in lines if line.startswith(("snakemake ", "python scripts/"))]
    return list(dict.fromkeys(map(tuple, commands)))  # each once


def test_every_readme_command_runs(built, tmp_path):
    """The README's snakemake commands as dry runs (report and rendering for real), with my_910b.yaml a
    copy of the 910B config whose base model has only config.json and tokenizer.model, as on a laptop;
    its python commands for real on the finished tiny run."""
    workdir, configfile = built
    real, laptop = laptop_910b_config(workdir, tmp_path)
    rank4 = default_config()
    rank4["lora"]["rank"] = 4
    tiny_13b = yaml.safe_load((REPO / "config" / "tiny_13b.yaml").read_text())
    tiny_13b["data"]["train"] = str(SAMPLE_DATA)
    experiments = yaml.safe_load((REPO / "config" / "tiny_experiments.yaml").read_text())
    experiments["data"]["train"] = str(SAMPLE_DATA)
    mine = yaml.safe_load(configfile.read_text())
    mine["results"] = "results/my_run"  # README "Your own data": a copy of the tiny config with a folder of its own
    files = {"my_910b.yaml": write_config(tmp_path / "my_910b.yaml", real), "my.yaml": write_config(tmp_path / "my.yaml", mine),
             "rank4.yaml": write_config(tmp_path / "rank4.yaml", rank4),
             "config/tiny_13b.yaml": write_config(tmp_path / "tiny_13b.yaml", tiny_13b),
             "config/tiny_experiments.yaml": write_config(tmp_path / "tiny_experiments.yaml", experiments)}
    commands = readme_commands()
    assert sum(c[0] == "snakemake" for c in commands) >= 10 and sum(c[0] == "python" for c in commands) >= 4
    for words in commands:
        for name, path in files.items():
            words = [w.replace(name, str(path)) if w.endswith(name) else w for w in words]
        words = [str(REPO / w) if w.startswith("profiles/") else w for w in words]  # run from the checkout
        if words[0] == "snakemake":
            args = words[1:]
            if not any(a.startswith("--configfile") for a in args):
                args += ["--configfile", str(configfile)]
            if "--report" not in args and "mf_config" not in args:
                args.append("-n")
            proc = snakemake(workdir, *args)
            assert "Error" not in proc.stderr.replace("WorkflowError", ""), proc.stderr[-2000:]
        else:
            proc = subprocess.run([sys.executable, str(REPO / words[1]), *words[2:]], cwd=workdir, input="Hi\n/quit\n",
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, (words, proc.stderr[-2000:])
    assert (workdir / "results/baichuan2_7b_910b/finetune/run_baichuan2_lora.yaml").is_file()  # rendered on a laptop


def test_every_target_the_docs_name_exists(tiny_config, tmp_path):
    """Issue 36: export_gguf was missing from the README's target list. The targets of the README's and
    docs' snakemake commands are rules, and docs/targets.md's table lists every rule, and nothing else."""
    import shlex

    listed = snakemake(tmp_path, "--list-rules", configfile=tiny_config).stdout
    rules = {line.split()[0] for line in listed.splitlines() if line and not line[0].isspace()}
    experiments = yaml.safe_load((REPO / "config/tiny_experiments.yaml").read_text())
    experiments["data"]["train"] = str(SAMPLE_DATA)
    listed = snakemake(tmp_path, "--list-rules", configfile=write_config(tmp_path / "e.yaml", experiments)).stdout
    experiment_rules = {line.split()[0] for line in listed.splitlines() if line and not line[0].isspace()
                        and not line.startswith(tuple(f"{name}_" for name in experiments["experiments"]))}
    takes_value = {"--cores", "--configfile", "--profile", "--report", "--config", "-j", "-s", "-d"}
    named = set()
    for words in readme_commands():
        if words[0] != "snakemake":
            continue
        words = [w for w in words[1:] if "=" not in w]
        named |= {w for before, w in zip(["snakemake", *words], words)
                  if not w.startswith("-") and before not in takes_value}
    assert named and named <= rules | experiment_rules, named - rules - experiment_rules
    table = (REPO / "docs/targets.md").read_text().split("| target (rule) |")[1].split("\n\n")[0]
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == rules


@pytest.mark.slow
def test_every_step_that_claims_to_be_deterministic_is(built, tmp_path):
    """Rerun, in another folder, every rule whose manifests say `deterministic`: each output is
    byte-identical to the first run's (the multi-rank finetune says it is not, and is not rerun)."""
    import hashlib
    import shutil

    workdir, configfile = built
    copy = tmp_path / "elsewhere"
    shutil.copytree(workdir / "results", copy / "results", symlinks=True)
    recorded, rules = {}, set()
    for path in (workdir / "results").rglob("*.manifest.json"):
        manifest = json.loads(path.read_text())
        if manifest["deterministic"]:
            rules.add(manifest["rule"])
            recorded.update({(path.parent / rel).relative_to(workdir): entry["sha256"]
                             for rel, entry in manifest["outputs"].items()})
        else:
            assert manifest["rule"] == "finetune", manifest["rule"]
    assert rules >= {"tiny_base", "ckpt", "mindrecord", "mf_config", "predict_config", "preflight", "filter_out",
                     "merged_ckpt", "fold_lora", "export_hf", "predict", "evaluate", "report"}
    snakemake(copy, "--cores", "2", "--forceall", "--allowed-rules", *sorted(rules), configfile=configfile)
    changed = [str(rel) for rel, sha in recorded.items()
               if hashlib.sha256((copy / rel).read_bytes()).hexdigest() != sha]
    assert not changed, changed


def start_snakemake(workdir, configfile, *args):
    """Snakemake in a session of its own, so that its whole process group can be killed."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           "--configfile", str(configfile), *args]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(proc, found, timeout=600):
    import time

    deadline = time.time() + timeout
    while not found():
        assert proc.poll() is None, f"the run ended before the kill point:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_anywhere_the_rerun_finishes_as_if_it_had_not_been(built, tmp_path):
    """SIGKILL the whole Snakemake process group during the conversion and during the finetune (a
    second run in the folder meanwhile is refused by Snakemake's lock); after `snakemake --unlock` the
    rerun completes: the deterministic artifacts are byte-identical to an uninterrupted run's, no
    temporary is left, nothing is stale, and every manifest verifies. The finetune killed mid-training
    leaves no process behind (issue 22: msrun and its ranks ran on), and its resume is exact: the
    checkpoints are byte-identical to the uninterrupted run's, and so is the loss of every step. The
    20-point sweep is benchmarks/kill_sweep.py."""
    import signal
    import time

    from lorapipe.formats.msckpt import iter_checkpoint
    from lorapipe.train.losslog import read_loss_tsv, read_rank_log

    first, _ = built
    workdir = tmp_path / "run"
    workdir.mkdir()
    configfile = make_run_workdir(workdir)
    results = workdir / "results/tiny"
    kill_points = [lambda: (results / "logs/ckpt.log").exists(),
                   lambda: list(results.glob(".finetune_state/*/output/checkpoint/rank_1/*.ckpt"))]
    for point in kill_points:
        run = start_snakemake(workdir, configfile)
        wait_for(run, point)
        if point is kill_points[-1]:
            second = snakemake(workdir, "--cores", "2", configfile=configfile, check=False)
            assert second.returncode != 0 and "LockException" in second.stdout + second.stderr
            assert run.poll() is None  # the first run goes on
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        if point is kill_points[-1]:
            deadline = time.time() + 5
            while processes_of(workdir) and time.time() < deadline:
                time.sleep(0.1)
            assert not processes_of(workdir), [p.info["cmdline"][:3] for p in processes_of(workdir)]
            killed_at = read_rank_log(next(results.glob(".finetune_state/*/train_log_rank_0.tsv")))[-1]
            assert killed_at["step"] < killed_at["total"], "the kill landed after training: nothing to resume"
        snakemake(workdir, "--unlock", configfile=configfile)
    snakemake(workdir, "--cores", "2", configfile=configfile)
    assert "resuming from global step" in (results / "logs/finetune.log").read_text()

    for artifact in ("tiny_base/pytorch_model.bin", "tiny_base/tokenizer.model", "ckpt/rank_0/baichuan2_tiny.ckpt",
                     "data/belle_64.mindrecord", "data/belle_64_heldout.mindrecord", "data/belle_64.stats.json",
                     "finetune/run_baichuan2_lora.yaml", "predict/run_baichuan2.yaml", "preflight.json",
                     "merged_ckpt/rank_0/checkpoint_0.ckpt"):
        assert (results / artifact).read_bytes() == (first / "results/tiny" / artifact).read_bytes(), artifact
    for rank in (0, 1):  # every tensor bit for bit (the file holds epoch_num and step_num in the other order)
        ckpt = f"finetune/checkpoint_network/rank_{rank}/baichuan2_tiny_lora.ckpt"
        resumed, uninterrupted = (dict(iter_checkpoint(root / "results/tiny" / ckpt)) for root in (workdir, first))
        assert resumed.keys() == uninterrupted.keys()
        assert all(resumed[k].tobytes() == v.tobytes() and resumed[k].dtype == v.dtype
                   for k, v in uninterrupted.items())
    losses = [[row["loss"] for row in read_loss_tsv(root / "results/tiny/finetune/loss.tsv")] for root in (workdir, first)]
    assert losses[0] == losses[1]
    assert not [p for p in results.rglob("*") if p.name.startswith(".lorapipe-tmp-") or ".tmp-" in p.name]
    assert "Nothing to be done" in snakemake(workdir, "-n", configfile=configfile).stdout
    # Killed after the final checkpoint but before the outputs were collected (issue 17): the rerun collects
    # the finished training, it does not resume it (MindSpore refuses epoch == initial_epoch).
    next(results.glob(".finetune_state/*/complete")).unlink()
    for output in ("loss.tsv", "adapter_config.json"):
        (results / "finetune" / output).unlink()
    snakemake(workdir, "--cores", "2", "finetune", configfile=configfile)
    log = (results / "logs/finetune.log").read_text()
    assert "already finished" in log and "resuming" not in log
    assert [row["loss"] for row in read_loss_tsv(results / "finetune/loss.tsv")] == losses[1]
    for artifact in ("merged_ckpt/rank_0/checkpoint_0.ckpt", "predict/predictions.jsonl", "report/summary.html"):
        verify = subprocess.run([sys.executable, str(REPO / "scripts/provenance.py"), "--verify",
                                 str(results / artifact)], capture_output=True, text=True)
        assert verify.returncode == 0 and " 0 problem(s)" in verify.stdout, verify.stdout[-2000:]


def processes_of(workdir):
    """Live processes with `workdir` on their command line: msrun (its --log_dir), its scheduler and the
    ranks (their --config), and msrun's `tail -f` of a worker log."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline", "status"])
            if str(workdir) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_benchmark_tasks_score_base_and_finetuned_and_rerun_alone(built, tmp_path):
    """Issue 31: evaluate.tasks on a complete run adds the task's job (and the report) and nothing else; the
    results name every question, the report shows them, the run ends with the accuracies, and an edit to the
    task reruns its job only."""
    from conftest import write_release

    workdir, configfile = built
    release = write_release(tmp_path / "mmlu", "mmlu", ["anatomy", "astronomy"], rows=5)
    cfg = yaml.safe_load(configfile.read_text())
    cfg["evaluate"] = {"tasks": [{"name": "mmlu", "path": str(release), "shots": 2, "subjects": ["anatomy", "astronomy"]}]}
    tasks = write_config(tmp_path / "tasks.yaml", cfg)
    results = workdir / "results/tiny"
    try:
        assert planned_jobs(snakemake(workdir, "-n", configfile=tasks)) == {"eval_task": 1, "report": 1, "all": 1}
        out = snakemake(workdir, "--cores", "2", configfile=tasks).stdout
        result = json.loads((results / "evaluate/mmlu.json").read_text())
        samples = [json.loads(line) for line in (results / "evaluate/mmlu.samples.jsonl").read_text().splitlines()]
        assert [(s["subject"], s["index"]) for s in samples] == [(s, i) for s in ("anatomy", "astronomy") for i in range(5)]
        assert all(len(s[m]["loglik"]) == 4 and s[m]["pick"] in range(4) for s in samples for m in ("base", "finetuned"))
        assert result["groups"].keys() == {"stem"}  # lm-eval's grouping: the release's mapping says anatomy is "Other"
        right = sum(s["finetuned"]["pick"] == s["gold"] for s in samples)
        assert result["overall"]["finetuned"] == right / 10 and result["subjects"]["anatomy"]["questions"] == 5
        line = (f"MMLU test 2-shot accuracy {100 * result['overall']['base']:.1f}% (base) -> "
                f"{100 * result['overall']['finetuned']:.1f}% (finetuned)")
        assert line in out
        page = (results / "report/summary.html").read_text()
        assert "<h2>Benchmarks</h2>" in page and "mmlu: accuracy by subject" in page
        assert (results / "report/mmlu_subjects.png").stat().st_size > 0
        cfg["evaluate"]["tasks"][0]["limit"] = 3
        edited = write_config(tmp_path / "limit.yaml", cfg)
        assert planned_jobs(snakemake(workdir, "-n", configfile=edited)) == {"eval_task": 1, "report": 1, "all": 1}
    finally:  # the run as it was, for the tests after this one
        for f in (results / "evaluate").glob("mmlu.*"):
            f.unlink()
        (results / "report/mmlu_subjects.png").unlink(missing_ok=True)
        snakemake(workdir, "--cores", "2", configfile=configfile)


def test_both_checkpoint_kinds_give_the_same_model(built, tmp_path):
    """Issue 32: with train.checkpoint_params all (the recipe's checkpoints: the whole network) instead of
    trainable (the default: nothing frozen), a rank's checkpoint is 13x larger on the tiny default, and
    merged_ckpt and merged_lora are the same bytes; the log says why the training state was replaced."""
    import shutil

    workdir, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "results", copy / "results", symlinks=True)
    cfg = yaml.safe_load(make_run_workdir(copy).read_text())
    cfg["train"]["checkpoint_params"] = "all"
    snakemake(copy, "--cores", "2", "--forcerun", "mf_config", "fold_lora",
              configfile=write_config(copy / "all.yaml", cfg))
    rank_0 = "results/tiny/finetune/checkpoint_network/rank_0"
    whole, trainable = (root / rank_0 / "baichuan2_tiny_lora.ckpt" for root in (copy, workdir))
    assert whole.stat().st_size > 12 * trainable.stat().st_size
    assert not (copy / rank_0 / "parameter_order.json").exists() and (workdir / rank_0 / "parameter_order.json").exists()
    for name in ("merged_ckpt/rank_0/checkpoint_0.ckpt", "merged_lora/rank_0/merged_lora.ckpt"):
        assert (copy / "results/tiny" / name).read_bytes() == (workdir / "results/tiny" / name).read_bytes(), name
    # whole checkpoints are merged without a copy under data parallel: rank 0's filter_out, hard-linked
    assert (copy / "results/tiny/merged_ckpt/rank_0/checkpoint_0.ckpt").stat().st_ino == \
        (copy / "results/tiny/filter_out/rank_0/baichuan2_tiny_lora.ckpt").stat().st_ino
    log = (copy / "results/tiny/logs/finetune.log").read_text()
    assert "removing the training state of an earlier run" in log and "lorapipe_checkpoint_params 'trainable' -> 'all'" in log


def test_safetensors_gives_the_same_tensors_and_resumes_exactly(built, tmp_path):
    """Issue 32: checkpoint.format safetensors. The converted base, the training checkpoints, filter_out,
    merged_ckpt and merged_lora are .safetensors holding the .ckpt run's tensors bit for bit; predictions,
    metrics and exports are the same bytes. Then the training, its newest checkpoint lost on every rank and
    resumed from a safetensors checkpoint of the trainable parameters (the base loaded under it), ends with
    the uninterrupted run's tensors and losses."""
    import shutil

    from lorapipe.formats.checkpoint_file import iter_checkpoint

    workdir, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "results", copy / "results", symlinks=True)
    cfg = yaml.safe_load(make_run_workdir(copy).read_text())
    cfg["checkpoint"] = {"format": "safetensors"}
    configfile = write_config(copy / "safetensors.yaml", cfg)
    # (the copy has no .snakemake metadata, which would tell Snakemake that mf_config's params changed)
    out = snakemake(copy, "--cores", "2", "--forcerun", "mf_config", configfile=configfile).stdout
    assert "merged_lora/rank_0/merged_lora.safetensors" in out.split("lorapipe: done")[1]  # the run's summary
    ours, theirs = copy / "results/tiny", workdir / "results/tiny"
    for name in ("ckpt/rank_0/baichuan2_tiny", "finetune/checkpoint_network/rank_1/baichuan2_tiny_lora",
                 "filter_out/rank_0/baichuan2_tiny_lora", "merged_ckpt/rank_0/checkpoint_0",
                 "merged_lora/rank_0/merged_lora"):
        got, want = (dict(iter_checkpoint(root / f"{name}{suffix}"))
                     for root, suffix in ((ours, ".safetensors"), (theirs, ".ckpt")))
        assert got.keys() == want.keys(), name
        assert [k for k in want if got[k].dtype != want[k].dtype or got[k].tobytes() != want[k].tobytes()] == [], name
    for name in ("predict/predictions.jsonl", "evaluate/metrics.json", "hf_llama/model.safetensors",
                 "gguf/baichuan2_tiny-q8_0.gguf", "peft_adapter/adapter_model.safetensors"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    state = next(p for p in (ours / ".finetune_state").iterdir() if (p / "complete").exists())
    (state / "complete").unlink()
    for rank in (0, 1):
        (state / f"output/checkpoint/rank_{rank}/baichuan2_tiny_lora_rank_{rank}-3_36.safetensors").unlink()
    snakemake(copy, "--cores", "2", "-f", "finetune", configfile=configfile)
    assert "resuming from global step 100" in (ours / "logs/finetune.log").read_text()
    for rank in (0, 1):
        name = f"finetune/checkpoint_network/rank_{rank}/baichuan2_tiny_lora"
        got, want = dict(iter_checkpoint(ours / f"{name}.safetensors")), dict(iter_checkpoint(theirs / f"{name}.ckpt"))
        assert [k for k in want if got[k].tobytes() != want[k].tobytes()] == [], rank
    from lorapipe.train.losslog import read_loss_tsv

    losses = [[(r["step"], r["loss"]) for r in read_loss_tsv(root / "finetune/loss.tsv")] for root in (ours, theirs)]
    assert losses[0] == losses[1] and len(losses[0]) == 108
