# lorapipe: the Baichuan2 LoRA recipe as a Snakemake build. See README.md and config/schema.yaml.
#
#   snakemake --cores 2                                                # the embedded tiny default
#   snakemake --cores 8 merged_ckpt --configfile=config/baichuan2_7b_910b.yaml
#
# (Targets before --configfile, or --configfile=FILE: --configfile takes several values, so a target
# after `--configfile FILE` would be read as a second config file.)

from lorapipe.config import (
    check_base_model_dir,
    load_workflow_config,
    run_position_embedding,
)
from lorapipe.infer.tasks import check_tasks

# The config: config/config.yaml, or the file(s) given with --configfile INSTEAD of it (Snakemake's
# own `configfile:` would merge the tiny default's keys into the real recipe). Each file is read
# strictly (a duplicate key is an error), --config overrides apply last, and the result is validated
# against config/schema.yaml and put in canonical form (lorapipe/config.py) before any job runs.
_loaded = load_workflow_config(
    [str(p) for p in workflow.overwrite_configfiles]
    or [f"{workflow.basedir}/config/config.yaml"],
    overrides=dict(workflow.config_settings.config),
)
config.clear()
config.update(_loaded)
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


include: "rules/common.smk"
include: "rules/weights.smk"
include: "rules/data.smk"
include: "rules/cluster.smk"
include: "rules/finetune.smk"
include: "rules/checkpoints.smk"
include: "rules/export.smk"
include: "rules/predict.smk"
include: "rules/report.smk"


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
