# One run of the recipe: the rules of every stage for one config. The Snakefile includes it for a plain config,
# and loads it once per experiment (as a Snakemake module, its rules prefixed with the experiment's name) when
# the config has experiments (lorapipe/experiments.py).

from lorapipe.config import check_base_model_dir, run_position_embedding
from lorapipe.infer.tasks import check_tasks

if config["base_model"]["path"] != "tiny":
    check_base_model_dir(config["base_model"]["path"])
# The architecture, decided once: RoPE (Baichuan2-7B) or ALiBi (Baichuan2-13B), from config.json (or the
# tiny model's settings) and base_model.position_embedding. Every job that needs it gets this value; an
# impossible combination stops here (lorapipe/config.py run_position_embedding).
POSITION_EMBEDDING = run_position_embedding(config)
# The benchmarks to score (evaluate.tasks), with their defaults; a bad entry stops here.
EVAL_TASKS = check_tasks(config["evaluate"]["tasks"])


envvars:
    "PATH",


include: "common.smk"
include: "weights.smk"
include: "data.smk"
include: "cluster.smk"
include: "finetune.smk"
include: "checkpoints.smk"
include: "export.smk"
include: "predict.smk"
include: "report.smk"


rule all:
    default_target: True
    input:
        MERGED_CKPT,
        f"{HF_EXPORT}/model.safetensors",
        LLAMA_EXPORTS,
        f"{REPORT}/summary.html",
        TASK_PLOTS,


onsuccess:
    # where the finetuned model, the exports and the report are, and the headline numbers
    from lorapipe.report import run_summary

    print(run_summary(config["results"], EVAL_TASKS))
