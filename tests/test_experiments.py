"""Many experiments in one DAG (issue 34, lorapipe/experiments.py): overrides validated like the config, the
shared stages built once, each experiment's own state, and the comparison.

The plans are dry runs (fast); the build of three experiments is marked slow (make test-slow)."""

import json
import shutil

import pytest
import yaml
from conftest import default_config, make_run_workdir, snakemake, write_config
from test_workflow import planned_jobs

from lorapipe.errors import ConfigError
from lorapipe.experiments import excluded_rules, expand, experiment_configs

THREE = {"r8": {}, "r16": {"lora": {"rank": 16, "alpha": 32}}, "packed": {"data": {"packing": True}}}
PER_EXPERIMENT = {"mf_config", "preflight", "finetune", "filter_out", "merged_ckpt", "fold_lora", "export_hf",
                  "predict_config", "predict", "evaluate", "report", "export_llama", "export_peft", "export_gguf"}


def with_experiments(experiments, **changes):
    from lorapipe.config import SCHEMA_PATH, canonical, load_yaml

    cfg = default_config() | changes | {"experiments": experiments}
    return canonical(cfg, load_yaml(SCHEMA_PATH))


def test_each_experiment_is_the_config_with_its_override_and_shares_the_stages_it_can():
    configs = experiment_configs(with_experiments(THREE))
    assert configs["r16"]["lora"]["rank"] == 16 and configs["r8"]["lora"]["rank"] == 8
    assert configs["packed"]["data"]["packing"] is True and configs["r8"]["train"] == configs["packed"]["train"]
    assert configs["r8"]["results"] == "results/tiny/experiments/r8"
    shared = {name: c["_shared"] for name, c in configs.items()}
    assert shared["r8"] == shared["r16"]  # the same base and data settings: the same folders
    assert shared["packed"]["base"] == shared["r8"]["base"] and shared["packed"]["data"] != shared["r8"]["data"]
    # the first experiment (by name) to need a shared folder builds it; the others leave its rules out
    assert excluded_rules(configs) == {"packed": [], "r16": ["tiny_base", "ckpt", "export_llama_base"],
                                       "r8": ["tiny_base", "ckpt", "export_llama_base", "mindrecord"]}


def test_a_grid_is_named_from_its_values():
    assert expand({"grid": {"lora.rank": [8, 16], "train.lr_schedule.learning_rate": [1e-3]}}) == {
        "rank8_learning_rate0.001": {"lora": {"rank": 8}, "train": {"lr_schedule": {"learning_rate": 1e-3}}},
        "rank16_learning_rate0.001": {"lora": {"rank": 16}, "train": {"lr_schedule": {"learning_rate": 1e-3}}}}
    configs = experiment_configs(with_experiments({"grid": {"lora.rank": [4, 8]}, "base": {}}))
    assert sorted(configs) == ["base", "rank4", "rank8"] and configs["rank4"]["lora"]["rank"] == 4


@pytest.mark.parametrize("override, message", [
    ({"lora": {"rnak": 16}}, "experiments.bad: unknown key lora.rnak (allowed here: alpha, dropout, rank, target_modules)"),
    ({"lora": {"rank": "sixteen"}}, "experiments.bad: lora.rank: 'sixteen' is not of type 'integer'"),
    ({"results": "elsewhere"}, "experiments.bad: results is the same for every experiment; it cannot differ"),
    ({"train": {"lr_schedule": {"lr_end": 1.0}}}, "experiments.bad: train.lr_schedule.lr_end 1.0 is above learning_rate"),
])
def test_a_bad_override_is_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        experiment_configs(with_experiments({"good": {}, "bad": override}))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_plan_builds_the_shared_stages_once(tmp_path):
    cfg = default_config() | {"experiments": THREE}
    jobs = planned_jobs(snakemake(tmp_path, "-n", "all_experiments", configfile=write_config(tmp_path / "c.yaml", cfg)))
    assert {j: n for j, n in jobs.items() if not j.startswith(("r8_", "r16_", "packed_"))} == {"all_experiments": 1}
    by_rule = {}
    for job in jobs:
        if job != "all_experiments":
            by_rule.setdefault(job.split("_", 1)[1], []).append(job.split("_", 1)[0])
    assert len(by_rule.pop("tiny_base")) == len(by_rule.pop("ckpt")) == len(by_rule.pop("export_llama_base")) == 1
    assert sorted(by_rule.pop("mindrecord")) == ["packed", "r16"]  # r8 and r16 share theirs
    assert {r: sorted(e) for r, e in by_rule.items()} == {r: ["packed", "r16", "r8"] for r in PER_EXPERIMENT}


@pytest.mark.slow
def test_three_experiments_run_share_and_compare(tmp_path):
    """Three experiments built: r8 (the config as it is) gives the tiny default's tensors, data, predictions and
    metrics; each has its own training state; the compare table has a row each; a fourth experiment plans only
    its own jobs, and removing one leaves the others as they are."""
    from conftest import REPO

    from lorapipe.formats.checkpoint_file import iter_checkpoint

    configfile = make_run_workdir(tmp_path)
    cfg = yaml.safe_load(configfile.read_text()) | {"experiments": THREE}
    three = write_config(tmp_path / "three.yaml", cfg)
    snakemake(tmp_path, "--cores", "2", "all_experiments", "compare", configfile=three)
    results = tmp_path / "results/tiny"
    recorded = {name: digest for digest, name in (line.split() for line in
                (REPO / "tests/data/tiny_default.sha256").read_text().splitlines() if not line.startswith("#"))}
    import hashlib

    r8 = results / "experiments/r8"
    for name in ("merged_ckpt/rank_0/checkpoint_0.ckpt", "merged_lora/rank_0/merged_lora.ckpt",
                 "predict/predictions.jsonl", "evaluate/metrics.json", "hf_llama/model.safetensors"):
        assert hashlib.sha256((r8 / name).read_bytes()).hexdigest() == recorded[name], name
    states = [p for e in THREE for p in (results / "experiments" / e / ".finetune_state").iterdir()]
    assert len(states) == 3  # one training state each: a kill or a resume of one never touches another's
    rows = {r["experiment"]: r for r in _csv(results / "compare/compare.csv")}
    assert sorted(rows) == ["packed", "r16", "r8"]
    metrics = json.loads((r8 / "evaluate/metrics.json").read_text())
    assert float(rows["r8"]["heldout_loss"]) == pytest.approx(metrics["finetuned"]["loss"])
    assert int(rows["r16"]["trainable_parameters"]) == 2 * int(rows["r8"]["trainable_parameters"])
    assert int(rows["r8"]["checkpoint_bytes"]) < int(rows["r16"]["checkpoint_bytes"])
    assert (results / "compare/compare.html").read_text().count("<tr>") == 4
    cfg["experiments"]["r4"] = {"lora": {"rank": 4, "alpha": 8}}
    four = write_config(tmp_path / "four.yaml", cfg)
    jobs = planned_jobs(snakemake(tmp_path, "-n", "all_experiments", configfile=four))
    assert {j.split("_", 1)[0] for j in jobs if j != "all_experiments"} == {"r4"}
    del cfg["experiments"]["r4"], cfg["experiments"]["packed"]
    two = write_config(tmp_path / "two.yaml", cfg)
    assert "Nothing to be done" in snakemake(tmp_path, "-n", "all_experiments", configfile=two).stdout
    assert (results / "experiments/packed/merged_ckpt/rank_0/checkpoint_0.ckpt").is_file()  # left alone
    shutil.rmtree(results / "experiments/packed")


def _csv(path):
    import csv

    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_under_the_slurm_profile_each_experiments_finetune_is_an_npu_job(tmp_path):
    """profiles/slurm names the plain rules; each experiment's copy gets the same resources: its finetune is a
    job of its own on the NPU partition (so a cluster runs them side by side), the shared steps on CPU."""
    from conftest import REPO
    from test_workflow import job_resources

    cfg = default_config() | {"experiments": THREE}
    out = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles/slurm"),
                    configfile=write_config(tmp_path / "c.yaml", cfg)).stdout
    resources = job_resources(out)
    for name in THREE:
        assert "slurm_partition=ascend" in resources[f"{name}_finetune"], resources[f"{name}_finetune"]
    assert "slurm_partition=cpu" in resources["packed_ckpt"] and "slurm_partition=cpu" in resources["r16_mindrecord"]
