import copy

import pytest
from conftest import REPO, default_config, snakemake, write_config

from lorapipe.config import check_base_model_dir, load_config, load_yaml, validate
from lorapipe.errors import ConfigError


def test_shipped_configs_are_valid():
    load_config(REPO / "config" / "config.yaml")
    real = load_config(REPO / "config" / "baichuan2_7b_910b.yaml")
    # The real recipe, as MindFormers' run_baichuan2_7b_lora_910b.yaml has it.
    assert real["data"]["seq_length"] == 512
    assert real["train"]["batch_size"] == 2 and real["train"]["epochs"] == 1
    assert real["parallel"]["data_parallel"] == 8 and real["parallel"]["workers"] == 8
    assert real["lora"] == {"rank": 1, "alpha": 32, "dropout": 0.1, "target_modules": ".*wq|.*wk|.*wv"}
    assert real["train"]["lr_schedule"]["learning_rate"] == 2e-5
    assert real["train"]["lr_schedule"]["lr_end"] == 2e-6
    assert real["train"]["compute_dtype"] == "float16"
    assert real["device_target"] == "Ascend" and real["parallel"]["max_device_memory"] == "59GB"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["lora"].update(rnak=4), "unknown key lora.rnak"),
        (lambda c: c.update(seq_length=512), "unknown key seq_length"),
        (lambda c: c["lora"].update(rank="eight"), "lora.rank: 'eight' is not of type 'integer'"),
        (lambda c: c["data"].update(on_bad_record="ignore"), "data.on_bad_record: 'ignore' is not one of"),
        (lambda c: c["train"].pop("epochs"), "missing required key train.epochs"),
        (lambda c: c.pop("tiny_base"), "missing required key tiny_base"),
        (lambda c: c["parallel"].update(data_parallel=4), "parallel.data_parallel * model_parallel"),
        (lambda c: c["parallel"].update(nodes=2, data_parallel=4, launcher="rank_table"),
         "parallel.nodes 2 needs parallel.launcher msrun"),
        # issue 27: values every rank refused only after it started, or that trained something not meant
        (lambda c: c["train"]["optimizer"].update(beta1=1.0), "train.optimizer.beta1: 1.0 is greater than or "
                                                              "equal to the maximum of 1"),
        (lambda c: c["train"]["optimizer"].update(beta2=0), "train.optimizer.beta2: 0 is less than or equal to "
                                                            "the minimum of 0"),
        (lambda c: c["train"]["optimizer"].update(eps=0), "train.optimizer.eps: 0 is less than or equal to"),
        (lambda c: c["train"]["lr_schedule"].update(lr_end=0.01), "train.lr_schedule.lr_end 0.01 is above "
                                                                  "learning_rate 0.003"),
        (lambda c: c["lora"].update(target_modules=".*wq|("), "lora.target_modules '.*wq|(' is not a regular "
                                                               "expression"),
        (lambda c: c.update(device_target="Ascend") or c["parallel"].update(visible_devices="0"),
         "parallel.visible_devices '0' must list parallel.workers = 2 different devices"),
        (lambda c: c.update(device_target="Ascend") or c["parallel"].update(visible_devices="3,3"),
         "parallel.visible_devices '3,3' must list"),
        (lambda c: c["train"].update(compute_dtype="bfloat16"), "MindSpore has no bfloat16 CPU kernels"),
    ],
)
def test_bad_config_names_the_key(edit, message):
    cfg = copy.deepcopy(default_config())
    edit(cfg)
    with pytest.raises(ConfigError) as e:
        validate(cfg, source="my.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("my.yaml")


def test_duplicate_key_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  checkpoint_name_or_path: 7b.ckpt\n  seq: 1\n  checkpoint_name_or_path: 13b.ckpt\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 4: duplicate key 'checkpoint_name_or_path' "
                                          r"\(first defined on line 2\)"):
        load_yaml(path)


def test_incomplete_base_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        check_base_model_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is missing tokenizer.model$"):
        check_base_model_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_text("")
    check_base_model_dir(tmp_path)  # the weights are the conversion's business, not the planner's


def test_workflow_refuses_bad_config_before_any_job(tmp_path):
    cfg = default_config()
    cfg["lora"]["rnak"] = 4
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "bad.yaml", cfg), check=False)
    assert proc.returncode != 0
    assert "unknown key lora.rnak" in proc.stdout + proc.stderr
    assert "Job stats" not in proc.stdout + proc.stderr


def test_workflow_refuses_duplicate_key(tmp_path):
    text = (REPO / "config" / "config.yaml").read_text() + "\nresults: elsewhere\n"
    bad = tmp_path / "dup.yaml"
    bad.write_text(text)
    proc = snakemake(tmp_path, "-n", configfile=bad, check=False)
    assert proc.returncode != 0 and "duplicate key 'results'" in proc.stdout + proc.stderr


def test_workflow_refuses_missing_base_model_dir(tmp_path):
    proc = snakemake(tmp_path, "-n", configfile=REPO / "config" / "baichuan2_7b_910b.yaml", check=False)
    assert proc.returncode != 0
    assert "base_model.path: /path/to/Baichuan2-7B-Chat is not a directory" in proc.stdout + proc.stderr


def test_canonical_form_ignores_spelling(tmp_path):
    from lorapipe.config import load_workflow_config

    a = tmp_path / "a.yaml"
    a.write_text((REPO / "config" / "config.yaml").read_text())
    b = tmp_path / "b.yaml"
    b.write_text((REPO / "config" / "config.yaml").read_text().replace("learning_rate: 3.0e-3", "learning_rate: 3e-3")
                 .replace("alpha: 16", "alpha: 16.0").replace("train: data/", "train: ./data/"))
    ca, cb = load_workflow_config([a]), load_workflow_config([b])
    assert repr(ca) == repr(cb)  # what Snakemake compares to decide a rerun
    assert list(ca) == sorted(ca) and ca["lora"]["alpha"] == 16.0 and isinstance(ca["lora"]["alpha"], float)
    assert isinstance(ca["lora"]["rank"], int) and ca["data"]["train"] == "data/belle_sample.json"
    assert str(ca["lora"]) == '{"alpha": 16.0, "dropout": 0.0, "rank": 8, "target_modules": ".*wq|.*wk|.*wv"}'


def test_paths_expand_the_home_folder(tmp_path, monkeypatch):
    """Issue 36: `~/data/chat.json` in a config named a folder called `~` under the working directory."""
    from lorapipe.config import load_workflow_config

    monkeypatch.setenv("HOME", str(tmp_path))
    text = (REPO / "config" / "config.yaml").read_text().replace("train: data/belle_sample.json", "train: ~/d/chat.json")
    (tmp_path / "c.yaml").write_text(text.replace("results: results/tiny", "results: ~/runs/tiny"))
    cfg = load_workflow_config([tmp_path / "c.yaml"])
    assert cfg["data"]["train"] == f"{tmp_path}/d/chat.json" and cfg["results"] == f"{tmp_path}/runs/tiny"


def test_a_missing_data_path_or_an_empty_glob_stops_the_plan_naming_the_key(tmp_path):
    cfg = default_config()
    for train, message in [
        ("/nowhere/belle.json", "data.train: /nowhere/belle.json does not exist"),
        (str(tmp_path / "none-*.json"), f"data.train: no file matches {tmp_path}/none-*.json"),
        (str(tmp_path), f"data.train: {tmp_path} is a directory, expected a chat JSON/JSONL file or a glob"),
        ([{"path": cfg["data"]["train"]}, {"path": "/nowhere/more.jsonl", "weight": 2}],
         "data.train[1].path: /nowhere/more.jsonl does not exist"),
    ]:
        cfg["data"]["train"] = train
        proc = snakemake(tmp_path, "-n", "mindrecord", configfile=write_config(tmp_path / "c.yaml", cfg), check=False)
        assert proc.returncode != 0 and f"ConfigError: {message}" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_the_schema_default_fills_an_optional_key():
    cfg = default_config()
    assert "allow_seq_length_over_max_positions" not in cfg["data"]
    from lorapipe.config import SCHEMA_PATH, canonical, load_yaml

    assert canonical(cfg, load_yaml(SCHEMA_PATH))["data"]["allow_seq_length_over_max_positions"] is False
