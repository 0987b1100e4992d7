# Paths and small input helpers shared by the rules. Wiring only: config values reach the rules that
# use them through `params:` there, and nothing here reads a file while the workflow is parsed.

import glob
import os
from pathlib import Path

from lorapipe.config import (
    ConfigSection,
    data_files as checked_data_files,
    existing_file,
    pick,
)
from lorapipe.formats.checkpoint_file import SUFFIX
from lorapipe.model.architecture import ALIBI, require_rope

RESULTS = config["results"]
SCRIPTS = f"{workflow.basedir}/scripts"
# An experiment (lorapipe/experiments.py) builds the stages before the finetune in shared folders, keyed by
# a digest of what they read; a plain run builds them under RESULTS.
SHARED = config.get("_shared", {"base": RESULTS, "data": RESULTS})
TINY = config["base_model"]["path"] == "tiny"
TINY_BASE = f"{SHARED['base']}/tiny_base"
BASE_MODEL = TINY_BASE if TINY else config["base_model"]["path"]


def log_path(rule):
    return f"{RESULTS}/logs/{rule}.log"


def benchmark_path(rule):
    return f"{RESULTS}/benchmarks/{rule}.tsv"


def base_file(name):
    """A file of the HF base model directory (the generated tiny model, or the user's download)."""
    return f"{BASE_MODEL}/{name}"


def base_weight_files(wildcards):
    """The weight files the conversion reads, as they are on disk when the DAG is built; the `ckpt`
    step itself checks that they are complete (planning needs only config.json and tokenizer.model).
    """
    if TINY:
        return [base_file("pytorch_model.bin")]
    patterns = ("*.safetensors", "*.bin", "*.index.json")
    return sorted(f for p in patterns for f in glob.glob(base_file(p)))


def data_files(wildcards):
    """The chat data files data.train names (a path, a glob, or a list of sources); a missing one stops
    the plan with the key that names it."""
    return checked_data_files(config["data"]["train"])


# The converted base model, in the rank_0/ folder MindFormers loads a complete checkpoint from.
BASE_CKPT_DIR = f"{SHARED['base']}/ckpt"
# checkpoint.format: .ckpt or .safetensors, for every checkpoint lorapipe writes for MindFormers.
CKPT_SUFFIX = SUFFIX[config["checkpoint"]["format"]]
BASE_CKPT = f"{BASE_CKPT_DIR}/rank_0/{config['base_model']['name']}{CKPT_SUFFIX}"

SEQ = config["data"]["seq_length"]
DATA_STATS = f"{SHARED['data']}/data/belle_{SEQ}.stats.json"


def mindrecord(split):
    """The MindRecord of a split: belle_<seq>.mindrecord (train) or belle_<seq>_heldout.mindrecord."""
    suffix = "" if split == "train" else f"_{split}"
    return f"{SHARED['data']}/data/belle_{SEQ}{suffix}.mindrecord"


RANK_TABLE = f"{RESULTS}/rank_table.json"


def hccn_conf(wildcards):
    """parallel.hccn_conf, the device IPs rank_table reads; a missing one stops the plan naming the key."""
    return existing_file(
        "parallel.hccn_conf",
        config["parallel"]["hccn_conf"],
        "the host's hccn.conf (address_<id>=<ip> lines)",
    )


RANK_TABLE_LAUNCH = config["parallel"]["launcher"] == "rank_table"


def node_rank_tables(table):
    """With several nodes, node k's own table is <table>.node<k>.json."""
    nodes = config["parallel"]["nodes"]
    return " ".join(f"{table}.node{k}.json" for k in range(nodes)) if nodes > 1 else ""


FINETUNE = f"{RESULTS}/finetune"
MF_CONFIG = f"{FINETUNE}/run_baichuan2_lora.yaml"
ADAPTER_CONFIG = f"{FINETUNE}/adapter_config.json"
FINETUNE_STATE = f"{RESULTS}/.finetune_state"
PREFLIGHT = f"{RESULTS}/preflight.json"


def finetune_inputs(wildcards):
    inputs = {
        "config": MF_CONFIG,
        "base_ckpt": BASE_CKPT,
        "train_data": mindrecord("train"),
    }
    if RANK_TABLE_LAUNCH:
        inputs["rank_table"] = RANK_TABLE
    return inputs


CHECKPOINT_NETWORK = f"{FINETUNE}/checkpoint_network"
# Training checkpoints of the trainable parameters only: merged_ckpt puts the frozen base back in.
TRAINABLE_ONLY = config["train"]["checkpoint_params"] == "trainable"
LOSS_TSV = f"{FINETUNE}/loss.tsv"
FILTER_OUT = f"{RESULTS}/filter_out"
MERGED_CKPT = f"{RESULTS}/merged_ckpt/rank_0/checkpoint_0{CKPT_SUFFIX}"
MERGED_LORA = f"{RESULTS}/merged_lora/rank_0/merged_lora{CKPT_SUFFIX}"
HF_EXPORT = f"{RESULTS}/hf"


def rope_export(export):
    """The params value of a RoPE-only export (ROPE_ONLY_EXPORTS): the run's architecture; for an ALiBi
    base model the plan stops with the reason. require_rope is the one guard, and the job applies it
    again to the value it is handed."""
    return lambda wildcards: require_rope(POSITION_EMBEDDING, export)


# The Llama and PEFT exports (rules/export.smk): plain HF Llama directories and PEFT adapter folders.
HF_LLAMA = f"{RESULTS}/hf_llama"
HF_LLAMA_BASE = (
    f"{SHARED['base']}/hf_llama_base"  # the base alone: shared by experiments
)
PEFT_ADAPTER = f"{RESULTS}/peft_adapter"
PEFT_ADAPTER_W_PACK = f"{RESULTS}/peft_adapter_w_pack"
# GGUF for llama.cpp (llama-cli, llama-server, Ollama, LM Studio): lorapipe/exports/gguf.py.
GGUF_DIR = f"{RESULTS}/gguf"
GGUF_FILES = [
    f"{GGUF_DIR}/{config['base_model']['name']}-{t}.gguf" for t in ("f16", "q8_0")
]
# The RoPE-only exports that `all` builds (all of them for a RoPE base model, none for ALiBi).
LLAMA_EXPORTS = (
    []
    if POSITION_EMBEDDING == ALIBI
    else [
        f"{HF_LLAMA}/model.safetensors",
        f"{HF_LLAMA_BASE}/model.safetensors",
        f"{PEFT_ADAPTER}/adapter_model.safetensors",
        *GGUF_FILES,
    ]
)
# What export_llama reads besides the checkpoint: the base model's config and tokenizer.
LLAMA_EXPORT_INPUTS = dict(
    base=base_file("config.json"),
    tokenizer=base_file("tokenizer.model"),
    script=f"{SCRIPTS}/export_llama.py",
)


def llama_dir(folder):
    """The outputs of an HF Llama directory export."""
    return dict(
        safetensors=f"{folder}/model.safetensors",
        others=multiext(
            f"{folder}/",
            "config.json",
            "generation_config.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ),
        manifest=f"{folder}/model.safetensors.manifest.json",
    )


def strategy_flag(checkpoints_dir):
    """Semi-auto parallel (Ascend) writes strategy files; data parallel on CPU writes none."""
    strategy = Path(checkpoints_dir) / "strategy"
    return f"--src_ckpt_strategy {strategy}" if strategy.is_dir() else ""


# Predict and evaluate run where the model trained: on Ascend one NPU (npus locally, gres under Slurm), on
# CPU the host (lorapipe/infer/loader.py use_device, and the host's fp32).
ONE_DEVICE = dict(
    npus=1 if config["device_target"] == "Ascend" else 0,
    gres="npu:1" if config["device_target"] == "Ascend" else "",
)

PREDICT_CONFIG = f"{RESULTS}/predict/run_baichuan2.yaml"
PREDICTIONS = f"{RESULTS}/predict/predictions.jsonl"
METRICS = f"{RESULTS}/evaluate/metrics.json"
# The standard benchmarks (evaluate.tasks; EVAL_TASKS in the Snakefile): one result per task.
TASK_RESULTS = [f"{RESULTS}/evaluate/{name}.json" for name in EVAL_TASKS]
TASK_PLOTS = [f"{RESULTS}/report/{name}_subjects.png" for name in EVAL_TASKS]
REPORT = f"{RESULTS}/report"
