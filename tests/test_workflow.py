"""The DAG as Snakemake sees it, and one end-to-end run of the tiny default."""

import json
import subprocess
import sys
from pathlib import Path
import re

import yaml

from conftest import REPO, SAMPLE_DATA, default_config, snakemake, write_config


def planned_jobs(proc):
    """{rule: count} from a dry run's job stats table."""
    table = proc.stdout.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_dry_run_default_plans_the_recipe(tmp_path, tiny_config):
    proc = snakemake(tmp_path, "-n", configfile=tiny_config)
    assert planned_jobs(proc) == {"tiny_base": 1, "ckpt": 1, "mindrecord": 1, "mf_config": 1, "finetune": 1,
                                  "filter_out": 1, "merged_ckpt": 1, "fold_lora": 1, "export_hf": 1, "predict": 1,
                                  "evaluate": 1, "report": 1, "all": 1}


def test_real_config_uses_the_users_base_model(tmp_path, tiny_config):
    # Any complete HF directory stands in for the Baichuan2-7B-Chat download.
    snakemake(tmp_path, "--cores", "1", "tiny_base", configfile=tiny_config)
    real = yaml.safe_load((REPO / "config" / "baichuan2_7b_910b.yaml").read_text())
    real["base_model"]["path"] = str(tmp_path / "results/tiny/tiny_base")
    real["data"]["train"] = str(SAMPLE_DATA)
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "real.yaml", real))
    assert planned_jobs(proc) == {"ckpt": 1, "mindrecord": 1, "mf_config": 1, "finetune": 1, "filter_out": 1,
                                  "merged_ckpt": 1, "fold_lora": 1, "export_hf": 1, "predict": 1, "evaluate": 1,
                                  "report": 1, "all": 1}


def test_end_to_end_tiny_default(tmp_path, tiny_config):
    snakemake(tmp_path, "--cores", "2", configfile=tiny_config)
    base = tmp_path / "results/tiny/tiny_base"
    assert (base / "pytorch_model.bin").stat().st_size > 0
    manifest = json.loads((base / "pytorch_model.bin.manifest.json").read_text())
    assert manifest["rule"] == "tiny_base"
    for rule in ("tiny_base", "ckpt", "mindrecord", "mf_config", "finetune", "filter_out", "merged_ckpt",
                 "fold_lora", "export_hf", "predict", "evaluate", "report"):
        assert (tmp_path / f"results/tiny/logs/{rule}.log").exists(), rule
        assert (tmp_path / f"results/tiny/benchmarks/{rule}.tsv").exists(), rule
    assert (tmp_path / "results/tiny/finetune/checkpoint_network/rank_1/baichuan2_tiny_lora.ckpt").exists()
    metrics = json.loads((tmp_path / "results/tiny/evaluate/metrics.json").read_text())
    assert metrics["finetuned"]["loss"] < metrics["base"]["loss"] - 0.5  # the finetune helped
    predictions = [json.loads(line) for line in
                   (tmp_path / "results/tiny/predict/predictions.jsonl").read_text().splitlines()]
    assert [(p["index"], p["model"]) for p in predictions] == [(i, m) for i in range(3) for m in ("finetuned", "base")]
    assert all(p["prompt_tokens"] > 0 and p["seconds"] >= 0 for p in predictions)
    report = snakemake(tmp_path, "--report", "report.html", configfile=tiny_config)
    assert (tmp_path / "report.html").stat().st_size > 10000, report.stderr
    # Nothing is stale after a complete run.
    assert "Nothing to be done" in snakemake(tmp_path, "-n", configfile=tiny_config).stdout


def test_rank_table_target(tmp_path):
    (tmp_path / "hccn.conf").write_text("address_0=192.98.0.10\naddress_1=192.98.1.10\n")
    cfg = default_config()
    cfg["parallel"].update(hccn_conf=str(tmp_path / "hccn.conf"), server_ip="10.0.0.1")
    snakemake(tmp_path, "--cores", "1", "rank_table", configfile=write_config(tmp_path / "c.yaml", cfg))
    table = json.loads((tmp_path / "results/tiny/rank_table.json").read_text())
    assert [d["device_ip"] for d in table["server_list"][0]["device"]] == ["192.98.0.10", "192.98.1.10"]


def test_lint_and_format_are_clean():
    """`snakemake --lint` has nothing to say and snakefmt would change nothing."""
    bin_dir = Path(sys.executable).parent
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "-s", str(REPO / "Snakefile")],
                          capture_output=True, text=True, cwd=REPO)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([str(bin_dir / "snakefmt"), "--check", str(REPO / "Snakefile"), str(REPO / "rules")],
                         capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
