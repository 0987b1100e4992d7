"""Load and check a lorapipe config: strict YAML, JSON-Schema validation, one canonical form.

The recipe's hand-edited YAML once listed `checkpoint_name_or_path` twice and PyYAML silently kept the
last one (the 13B path). Here a duplicate key is an error, and so is any key the schema does not know.

Snakemake reruns a job when the repr of its params changes. The canonical form (keys sorted, numbers
the schema calls `number` as floats, paths normalised) makes two files that say the same thing give the
same params: reordering keys, writing `3e-3` for `0.003`, `2` for `2.0` or `./data` for `data` reruns
nothing.
"""

import glob
import inspect
import json
import os
import re
from pathlib import Path

import jsonschema
import yaml

from lorapipe.data.sources import input_files, parse_sources
from lorapipe.errors import ConfigError
from lorapipe.model.architecture import (
    ROPE,
    position_embedding_of,
    unsupported_attention,
)

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{self.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first defined on line {seen[key] + 1}); a YAML mapping keeps only one value"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 reads `3e-3` as a float; PyYAML (YAML 1.1) reads it as a string, and the schema would then
# refuse a learning rate written that way.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(path):
    """Parse a YAML file, refusing duplicate keys. Returns the parsed document."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def _key_path(error):
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _describe(error):
    """One line for one schema violation, naming the key."""
    where = _key_path(error)
    prefix = "" if where == "<top level>" else f"{where}."
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = ", ".join(prefix + k for k in error.instance if k not in allowed)
        return f"unknown key {unknown} (allowed here: {', '.join(allowed)})"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"missing required key {prefix}{missing}"
    return f"{where}: {error.message}"


def validate(config, source="config", schema_path=SCHEMA_PATH):
    """Validate a config dict against the schema; raise ConfigError naming every bad key."""
    schema = load_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        raise ConfigError(f"{source}: invalid config:\n{lines}")
    par = config["parallel"]
    devices = par["workers"] * par["nodes"]
    layout = par["data_parallel"] * par["model_parallel"] * par["pipeline_stage"]
    if layout != devices:
        raise ConfigError(
            f"{source}: parallel.data_parallel * model_parallel * pipeline_stage = {layout}, "
            f"but parallel.workers * nodes = {devices} devices; they must be equal"
        )
    train = config["train"]
    if config["device_target"] == "CPU" and "bfloat16" in (train["compute_dtype"], train["param_init_type"]):
        raise ConfigError(f"{source}: train.compute_dtype {train['compute_dtype']} and param_init_type "
                          f"{train['param_init_type']}: MindSpore has no bfloat16 CPU kernels for this network "
                          f"(every rank stops at its first Reshape); use float32 or float16 on CPU")
    if config["train"]["use_flash_attention"] and config["device_target"] != "Ascend":
        raise ConfigError(f"{source}: train.use_flash_attention needs device_target Ascend (FlashAttentionScore "
                          f"has no {config['device_target']} kernel)")
    why = unsupported_attention(ROPE, config["data"]["packing"], train["use_flash_attention"])
    if why:
        raise ConfigError(f"{source}: data.packing needs train.use_flash_attention: false ({why})")
    if par["nodes"] > 1 and par["launcher"] != "msrun":
        raise ConfigError(f"{source}: parallel.nodes {par['nodes']} needs parallel.launcher msrun (the rank-table "
                          f"launcher starts one node)")
    devices = par["visible_devices"].split(",")  # (CPU ranks have no devices)
    if config["device_target"] != "CPU" and (len(devices) < par["workers"] or len(set(devices)) < len(devices)):
        raise ConfigError(f"{source}: parallel.visible_devices {par['visible_devices']!r} must list "
                          f"parallel.workers = {par['workers']} different devices (the ones behind ranks "
                          f"0..{par['workers'] - 1} of a node)")
    lr = config["train"]["lr_schedule"]
    if lr["lr_end"] > lr["learning_rate"]:
        raise ConfigError(f"{source}: train.lr_schedule.lr_end {lr['lr_end']} is above learning_rate "
                          f"{lr['learning_rate']}: the cosine schedule would raise the rate as training goes on")
    try:
        re.compile(config["lora"]["target_modules"])
    except re.error as e:
        raise ConfigError(f"{source}: lora.target_modules {config['lora']['target_modules']!r} is not a regular "
                          f"expression ({e})") from None
    return config


class ConfigSection(dict):
    """A config mapping whose str() is canonical JSON, so that a rule's shell command can hand a
    whole section to a script: `--lora {params.lora:q}`. Its repr (what Snakemake compares to decide
    a rerun) stays the dict's, with keys in sorted order."""

    def __str__(self):
        return json.dumps(self, sort_keys=True, ensure_ascii=False)


def _schema_types(schema):
    types = schema.get("type", [])
    types = {types} if isinstance(types, str) else set(types)
    for alternative in schema.get("oneOf", []) + schema.get("anyOf", []):
        types |= _schema_types(alternative)
    return types


def canonical(value, schema):
    """`value` in canonical form under `schema`: mappings as ConfigSections with sorted keys and the
    schema's `default` filled in for an optional key left out (so that rules and jobs read every key
    directly), integers as floats where the schema says number (not integer), `format: path` strings
    normalised, `~` expanded."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        value = {**{k: p["default"] for k, p in properties.items() if "default" in p}, **value}
        return ConfigSection((k, canonical(value[k], properties.get(k, {}))) for k in sorted(value))
    if isinstance(value, list):
        return [canonical(v, schema.get("items", {})) for v in value]
    types = _schema_types(schema)
    if type(value) is int and "number" in types and "integer" not in types:
        return float(value)
    if isinstance(value, str) and schema.get("format") == "path":
        return os.path.normpath(os.path.expanduser(value))
    return value


def pick(section, *keys):
    """The given keys of a config section: params for a rule that uses only these."""
    return ConfigSection((k, section[k]) for k in sorted(keys))


def load_workflow_config(paths, overrides=None):
    """The workflow's config: each file read strictly, merged in order, `overrides` (Snakemake's
    --config) applied last, validated, and in canonical form."""
    config = {}
    for path in paths:
        document = load_yaml(path)
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping of keys at top level")
        _merge(config, document)
    _merge(config, overrides or {})
    source = ", ".join(map(str, paths))
    validate(config, source=source)
    return canonical(config, load_yaml(SCHEMA_PATH))


def _merge(into, update):
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def load_config(path):
    """Load one config file strictly, validate it and put it in canonical form."""
    return load_workflow_config([path])


# What planning and rendering need; the weights are checked where the conversion reads them, so that
# `snakemake -n` and `mf_config` work on a machine that has only these two files.
BASE_MODEL_FILES = ("config.json", "tokenizer.model")


def run_position_embedding(config):
    """"rope" or "alibi": the architecture of the run's base model (lorapipe.model.architecture.position_embedding_of),
    for planning (rule `all`: a Llama-format export needs RoPE) and for an early, clear error. The tiny
    model's comes from the config.json tiny_base will write (tiny_base.hf_config); a user's from its config.json, which
    planning needs anyway (BASE_MODEL_FILES). Raises ConfigError for an impossible combination: an
    override that contradicts config.json, or ALiBi with train.use_flash_attention."""
    base = config["base_model"]
    if base["path"] == "tiny":
        from lorapipe.weights.tiny_base import hf_config as tiny_hf_config

        tiny = config["tiny_base"]
        hf_config = tiny_hf_config(**{k: tiny[k] for k in inspect.signature(tiny_hf_config).parameters if k in tiny})
        where = "tiny_base.position_embedding"
    else:
        path = Path(base["path"]) / "config.json"
        try:
            hf_config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"base_model.path: cannot read {path}: {e}") from None
        where = str(path)
    kind = position_embedding_of(hf_config, base.get("position_embedding", "auto"), where)
    why = unsupported_attention(kind, use_flash_attention=config["train"]["use_flash_attention"])
    if why:
        raise ConfigError(f"train.use_flash_attention: the base model is ALiBi ({where}); {why}: set it to false")
    return kind


def data_files(train):
    """The files data.train names (lorapipe.data.sources.input_files), each one checked: a path that does not
    exist or is not a file, or a glob that matches nothing, is a ConfigError naming the key and the path.
    Snakemake alone plans nothing for a missing input whose outputs exist ("Nothing to be done"), and
    an empty glob is no input at all: either way the old data would stand for the new."""
    files = []
    for i, source in enumerate(parse_sources(train)):
        key = f"data.train[{i}].path" if isinstance(train, (list, tuple)) else "data.train"
        found = input_files([source.path])
        if glob.has_magic(source.path) and not found:
            raise ConfigError(f"{key}: no file matches {source.path}")
        files += [existing_file(key, path, "a chat JSON/JSONL file or a glob") for path in found]
    return files


def existing_file(key, path, expected):
    """`path`, which config key `key` names, if it is a file; else a ConfigError naming both."""
    if not Path(path).is_file():
        problem = f"is a directory, expected {expected}" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"{key}: {path} {problem}")
    return str(path)


def check_base_model_dir(path):
    """Fail early, naming the path, if a user-supplied HF base model directory lacks what planning
    needs (config.json, tokenizer.model)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"base_model.path: {path} is not a directory (expected a Baichuan2 HF model "
                          f"directory with {', '.join(BASE_MODEL_FILES)} and weights)")
    missing = [f for f in BASE_MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise ConfigError(f"base_model.path: {path} is missing {', '.join(missing)}")
