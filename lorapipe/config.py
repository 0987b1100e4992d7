"""Load and check a lorapipe config: strict YAML (no duplicate keys) and JSON-Schema validation.

The recipe's hand-edited YAML once listed `checkpoint_name_or_path` twice and PyYAML silently kept the
last one (the 13B path). Here a duplicate key is an error, and so is any key the schema does not know.
"""

from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file and the key."""


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
    if par["nodes"] > 1 and par["launcher"] != "msrun":
        raise ConfigError(f"{source}: parallel.nodes {par['nodes']} needs parallel.launcher msrun (the rank-table "
                          f"launcher starts one node)")
    return config


def load_config(path):
    """Load one config file strictly and validate it."""
    config = load_yaml(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys at top level")
    return validate(config, source=str(path))


BASE_MODEL_FILES = ("config.json", "tokenizer.model")
BASE_MODEL_WEIGHTS = ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin.index.json",
                      "model.safetensors.index.json")


def check_base_model_dir(path):
    """Fail early, naming the path, if a user-supplied HF base model directory is incomplete."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"base_model.path: {path} is not a directory (expected a Baichuan2 HF model "
                          f"directory with {', '.join(BASE_MODEL_FILES)} and weights)")
    missing = [f for f in BASE_MODEL_FILES if not (path / f).is_file()]
    if not any((path / f).is_file() for f in BASE_MODEL_WEIGHTS):
        missing.append(" or ".join(BASE_MODEL_WEIGHTS))
    if missing:
        raise ConfigError(f"base_model.path: {path} is missing {', '.join(missing)}")
