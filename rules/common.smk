# Small path and parameter helpers shared by the rules. No logic beyond wiring.

import os
import json
import shlex
import sys
from pathlib import Path

RESULTS = config["results"]
TINY_BASE = f"{RESULTS}/tiny_base"
TINY = config["base_model"]["path"] == "tiny"
# The environment running Snakemake runs the steps too: its bin/ (python, msrun) comes first on PATH,
# so a rule never picks up another Python, also when snakemake is started as .venv/bin/snakemake.
os.environ["PATH"] = os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ["PATH"]]
)
SCRIPTS = f"{workflow.basedir}/scripts"


def log_path(rule):
    return f"{RESULTS}/logs/{rule}.log"


def benchmark_path(rule):
    return f"{RESULTS}/benchmarks/{rule}.tsv"


def base_model_dir():
    """The HF base model directory: the generated tiny model, or the user's Baichuan2 download."""
    return TINY_BASE if TINY else config["base_model"]["path"]


def cli_flags(section, keys=None):
    """`--key value` flags for (a subset of) a config section, as the scripts' argparse expects."""
    items = config[section].items()
    return " ".join(f"--{k} {v}" for k, v in items if keys is None or k in keys)


def base_model_files():
    """The base model files the conversion reads: config.json and the weights."""
    base = base_model_dir()
    if TINY:
        return [f"{base}/config.json", f"{base}/pytorch_model.bin"]
    from lorapipe.weights import weight_files

    return [f"{base}/config.json", *map(str, weight_files(base))]


def base_ckpt():
    """The converted base checkpoint, in the rank_0/ folder MindFormers loads from."""
    return f"{RESULTS}/ckpt/rank_0/{config['base_model']['name']}.ckpt"


SEQ = config["data"]["seq_length"]


def mindrecord(split):
    """The MindRecord of a split: belle_<seq>.mindrecord (train) or belle_<seq>_heldout.mindrecord."""
    suffix = "" if split == "train" else f"_{split}"
    return f"{RESULTS}/data/belle_{SEQ}{suffix}.mindrecord"


def data_files():
    """The BELLE JSON files data.train names (a path or a glob)."""
    from lorapipe.data import input_files

    return input_files(config["data"]["train"])


RANK_TABLE = f"{RESULTS}/rank_table.json"


FINETUNE = f"{RESULTS}/finetune"
MF_CONFIG = f"{FINETUNE}/run_baichuan2_lora.yaml"


def finetune_settings():
    """Every config value that shapes training; all of it lands in the rendered MindFormers YAML."""
    return {
        "name": config["base_model"]["name"],
        "seq_length": SEQ,
        "device_target": config["device_target"],
        "lora": config["lora"],
        "train": config["train"],
        "parallel": {
            k: config["parallel"][k]
            for k in (
                "data_parallel",
                "model_parallel",
                "pipeline_stage",
                "max_device_memory",
            )
        },
    }


def adapter_settings():
    from lorapipe.finetune import adapter_config

    return adapter_config(config["lora"], base_model_dir(), SEQ)


def finetune_inputs(wildcards):
    inputs = {
        "config": MF_CONFIG,
        "base_ckpt": base_ckpt(),
        "train_data": mindrecord("train"),
    }
    if config["parallel"]["launcher"] == "rank_table":
        inputs["rank_table"] = RANK_TABLE
    return inputs


def slurm_request():
    """The finetune job's allocation under profiles/slurm: every node, one task each, its devices."""
    par = config["parallel"]
    kind = {"Ascend": "npu", "GPU": "gpu"}.get(config["device_target"])
    gres = f" --gres={kind}:{par['workers']}" if kind else ""
    return f"'--nodes={par['nodes']} --ntasks-per-node=1{gres}'"


def launch_flags():
    par = config["parallel"]
    flags = f"--launcher {par['launcher']} --workers {par['workers']} --nodes {par['nodes']}"
    if par["master_addr"]:
        flags += f" --master_addr {par['master_addr']}"
    if par["master_port"]:
        flags += f" --master_port {par['master_port']}"
    if par["launcher"] == "rank_table":
        flags += (
            f" --rank_table {RANK_TABLE} --visible_devices {par['visible_devices']}"
        )
    return flags


FILTER_OUT = f"{RESULTS}/filter_out"
MERGED_CKPT = f"{RESULTS}/merged_ckpt/rank_0/checkpoint_0.ckpt"
MERGED_LORA = f"{RESULTS}/merged_lora/rank_0/merged_lora.ckpt"
HF_EXPORT = f"{RESULTS}/hf"


def strategy_flag(checkpoints_dir):
    strategy = Path(checkpoints_dir) / "strategy"
    return f"--src_ckpt_strategy {strategy}" if strategy.is_dir() else ""


PREDICTIONS = f"{RESULTS}/predict/predictions.jsonl"
METRICS = f"{RESULTS}/evaluate/metrics.json"


def generation_flags():
    keys = (
        "max_new_tokens",
        "do_sample",
        "top_k",
        "top_p",
        "temperature",
        "repetition_penalty",
    )
    return " ".join(f"--{k} {config['predict'][k]}" for k in keys)


REPORT = f"{RESULTS}/report"
DATA_STATS = f"{RESULTS}/data/belle_{SEQ}.stats.json"


def node_rank_tables(table):
    """With several nodes, node k's own table is <table>.node<k>.json."""
    nodes = config["parallel"]["nodes"]
    return " ".join(f"{table}.node{k}.json" for k in range(nodes)) if nodes > 1 else ""
