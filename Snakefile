# lorapipe: the Baichuan2 LoRA recipe as a Snakemake build. See README.md and config/schema.yaml.
#
#   snakemake --cores 2                                                # the embedded tiny default
#   snakemake --cores 8 merged_ckpt --configfile=config/baichuan2_7b_910b.yaml
#
# (Targets before --configfile, or --configfile=FILE: --configfile takes several values, so a target
# after `--configfile FILE` would be read as a second config file.)

from lorapipe.config import load_workflow_config

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

if config.get("experiments"):
    # Many experiments in one DAG: rules/run.smk once per experiment, its rules named <experiment>_<rule>,
    # leaving out the shared stages an earlier experiment already builds (lorapipe/experiments.py).
    from lorapipe.experiments import excluded_rules, experiment_configs

    EXPERIMENTS = experiment_configs(config)
    _excluded = excluded_rules(EXPERIMENTS)
    # A profile's set-resources and set-threads name the plain rules (profiles/slurm: finetune on the NPU
    # partition); they hold for each experiment's copy too. Read when each rule is declared, so set first.
    for _settings in (
        workflow.resource_settings._parsed_overwrite_resources,
        workflow.resource_settings._parsed_overwrite_threads,
    ):
        for _rule, _value in list(_settings.items()):
            for _name in EXPERIMENTS:
                _settings.setdefault(f"{_name}_{_rule}", _value)
    # What Snakemake's `module` and `use rule * from ... as <name>_*` statements compile to, called directly
    # because the names come from the config (Snakemake 9.27, envs/common.txt).
    for _name, _config in EXPERIMENTS.items():
        workflow.module(
            snakefile=f"{workflow.basedir}/rules/run.smk",
            config=_config,
            name=f"experiment_{_name}",
        )
        workflow.userule(
            rules=["*"],
            from_module=f"experiment_{_name}",
            exclude_rules=_excluded[_name],
            name_modifier=f"{_name}_*",
        )(lambda: None)

    include: "rules/experiments.smk"

    # (an included file's default_target does not last)
    workflow.default_target = "all_experiments"

else:

    include: "rules/run.smk"

    workflow.default_target = "all"
