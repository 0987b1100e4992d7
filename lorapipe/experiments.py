"""Many experiments in one DAG: each a deep override of the config, sharing every artifact whose inputs are equal.

`experiments:` in the config names each experiment and what it changes ({} for the config as it is), or gives
a `grid:` of dotted keys and values whose product is named from the values. Each experiment is the config with
its override merged in, validated like the config itself; its own artifacts live under
<results>/experiments/<name>/ (its training state, and so its kills, locks and resumes, included). The stages
before the finetune are shared: the converted base (and the tiny base) under <results>/shared/base-<digest>/,
the MindRecords under <results>/shared/data-<digest>/, the digest being of everything those rules read, so two
experiments with the same base and data settings build them once, and an experiment that changes
data.packing builds its own MindRecords but shares the base. The Snakefile loads rules/run.smk once per
experiment as a Snakemake module (rules prefixed `<name>_`), leaving out the shared rules an earlier
experiment already provides (excluded_rules).
"""

import copy
import hashlib
import itertools
import json

from lorapipe.config import SCHEMA_PATH, _merge, canonical, load_yaml, validate
from lorapipe.data.sources import draws_samples
from lorapipe.errors import ConfigError

# The rules of each shared stage (rules/weights.smk, rules/data.smk, and the base's Llama export).
SHARED_RULES = {"base": ("tiny_base", "ckpt", "export_llama_base"), "data": ("mindrecord",)}
FORBIDDEN = ("results", "experiments")


def _digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _name_part(key, value):
    return f"{key.rsplit('.', 1)[-1]}{value}".replace("/", "_").replace(" ", "")


def _nested(dotted, value):
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def expand(experiments):
    """{name: override}: the named entries, and the `grid:` product, named from its values."""
    named = {k: v for k, v in experiments.items() if k != "grid"}
    grid = experiments.get("grid") or {}
    for values in itertools.product(*grid.values()) if grid else ():
        override = {}
        for key, value in zip(grid, values):
            _merge(override, _nested(key, value))
        name = "_".join(_name_part(k, v) for k, v in zip(grid, values))
        if name in named:
            raise ConfigError(f"experiments: the grid's {name} is also named in experiments")
        named[name] = override
    return named


def shared_inputs(cfg):
    """What the shared stages read ({stage: value}): the base rules read base_model, checkpoint.format and,
    for the tiny base, its settings and the data its tokenizer is trained on; the data rule reads the
    tokenizer (the base's) and the data settings."""
    base = {"base_model": cfg["base_model"], "format": cfg["checkpoint"]["format"]}
    if cfg["base_model"]["path"] == "tiny":
        base |= {"tiny_base": cfg["tiny_base"], "train": cfg["data"]["train"]}
    data = {"base": _digest(base), "data": cfg["data"],
            "sample_seed": cfg["train"]["seed"] if draws_samples(cfg["data"]["train"]) else 0}
    return {"base": base, "data": data}


def experiment_configs(config):
    """{name: the experiment's whole config}, each with results <results>/experiments/<name> and `_shared`:
    {stage: the folder of that shared stage}."""
    if not isinstance(config.get("experiments"), dict) or not config["experiments"]:
        raise ConfigError("experiments: a mapping of experiment names to overrides ({} for the config as it is)")
    schema = load_yaml(SCHEMA_PATH)
    base = {k: v for k, v in config.items() if k != "experiments"}
    configs = {}
    for name, override in expand(config["experiments"]).items():
        where = f"experiments.{name}"
        if not isinstance(override, dict):
            raise ConfigError(f"{where}: an override of the config (a mapping, {{}} for none), not {override!r}")
        fixed = [k for k in FORBIDDEN if k in override]
        if fixed:
            raise ConfigError(f"{where}: {fixed[0]} is the same for every experiment; it cannot differ")
        merged = copy.deepcopy(base)
        _merge(merged, copy.deepcopy(override))
        try:
            validate(merged, source=where)
        except ConfigError as e:  # one line: the first problem (a schema error lists them under a heading)
            lines = [line.strip(" -") for line in str(e).splitlines()[1:]]
            if not lines:
                raise
            raise ConfigError(f"{where}: {lines[0]}" + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""))
        cfg = canonical(merged, schema)
        cfg["results"] = f"{config['results']}/experiments/{name}"
        cfg["_shared"] = {stage: f"{config['results']}/shared/{stage}-{_digest(value)}"
                          for stage, value in shared_inputs(cfg).items()}
        configs[name] = cfg
    return configs


def excluded_rules(configs):
    """{name: the shared rules its module leaves out}: those whose folder an earlier experiment builds."""
    built, excluded = set(), {}
    for name, cfg in configs.items():
        excluded[name] = [rule for stage, rules in SHARED_RULES.items() if cfg["_shared"][stage] in built
                          for rule in rules]
        built |= set(cfg["_shared"].values())
    return excluded
