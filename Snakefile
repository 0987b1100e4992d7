# lorapipe: the Baichuan2 LoRA recipe as a Snakemake build. See README.md and config/schema.yaml.
#
#   snakemake --cores 2                          # the embedded tiny default, end to end
#   snakemake --cores 8 --configfile config/baichuan2_7b_910b.yaml merged_ckpt

from snakemake.utils import update_config

from lorapipe.config import check_base_model_dir, load_yaml, validate

# The config: config/config.yaml, or the file(s) given with --configfile INSTEAD of it (Snakemake's
# own `configfile:` would merge the tiny default's keys into the real recipe's). Each file is read
# strictly (a duplicate key is an error), --config overrides apply last, and the result is
# validated against config/schema.yaml before any job runs.
_config_files = [str(p) for p in workflow.overwrite_configfiles] or [
    f"{workflow.basedir}/config/config.yaml"
]
_cli_overrides = dict(config)
config.clear()
for _path in _config_files:
    update_config(config, load_yaml(_path))
update_config(config, _cli_overrides)
validate(config, source=", ".join(_config_files))
if config["base_model"]["path"] != "tiny":
    check_base_model_dir(config["base_model"]["path"])


envvars:
    "PATH",


include: "rules/common.smk"
include: "rules/weights.smk"
include: "rules/data.smk"
include: "rules/cluster.smk"
include: "rules/finetune.smk"
include: "rules/checkpoints.smk"
include: "rules/predict.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        MERGED_CKPT,
        f"{HF_EXPORT}/model.safetensors",
        f"{REPORT}/summary.html",
