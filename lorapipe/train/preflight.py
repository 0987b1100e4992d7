"""Preflight: on the host, without a device, check what would otherwise fail after every rank started.

The checks are lorapipe.train.checks, lorapipe.train.network_checks (on the network built without
weights) and lorapipe.train.trial_step; it writes preflight.json, or fails naming every failed check."""

import json
from dataclasses import asdict

from lorapipe.errors import StepError
from lorapipe.outputs import atomic_outputs
from lorapipe.train.checks import (
    Check,
    check_data,
    check_devices,
    check_heads,
    check_launcher,
    check_layout,
    check_positions,
    check_rank_table,
    check_tokenizer,
)
from lorapipe.train.mindformers_yaml import read_mindformers_yaml
from lorapipe.train.network_checks import (
    build_network_check,
    check_checkpoint,
    check_lora,
    check_memory,
    check_saves,
    check_strategies,
    network_parameters,
)
from lorapipe.train.trial_step import check_trial_step


class PreflightError(StepError):
    """One or more checks failed; the message lists them."""


def run_preflight(rendered_yaml, base_ckpt, tokenizer, train_data, parallel, rank_table=None, hccn_conf=None,
                  hf_config=None, allow_longer=False):
    """All checks for a finetune, in order; never raises for a failed check (see format_checks()). The checks
    that need the network are skipped when it cannot be built."""
    rendered = read_mindformers_yaml(rendered_yaml)
    model_config = rendered["model"]["model_config"]
    device_target = rendered["context"]["device_target"]
    checks = [check_devices(device_target, parallel),
              check_launcher(parallel), check_rank_table(rank_table, parallel, hccn_conf or "/etc/hccn.conf"),
              check_heads(model_config), check_layout(model_config, rendered)]
    net = None
    if checks[-1].status != "fail" and checks[-2].status != "fail":
        net, failed = build_network_check(rendered_yaml)
        checks += [failed] if failed else []
    if net is not None:
        params = network_parameters(net)
        checks += [*check_checkpoint(params, base_ckpt, model_config["param_init_type"]),
                   check_lora(params, model_config), check_saves(params, rendered)]
    else:
        checks.append(Check("network checks", "skipped", "checkpoint, LoRA, memory and shard strategies need the "
                                                         "network, which cannot be built with this layout"))
    checks.append(check_tokenizer(tokenizer, model_config))
    if hf_config is not None:
        checks.append(check_positions(model_config, hf_config, allow_longer))
    checks += check_data(train_data, rendered)
    if net is not None:
        checks += [check_memory(model_config, rendered, params, device_target), check_strategies(net, rendered)]
    failed = [c.name for c in checks if c.status == "fail"]
    checks.append(check_trial_step(rendered, train_data) if not failed else
                  Check("trial step", "skipped", f"the training step runs once {', '.join(failed)} pass"))
    return checks


def format_checks(checks):
    """One table of the checks."""
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.name:<{width}}  {c.status:<7}  {c.detail}" for c in checks)


def write_preflight_json(checks, path, run=None, inputs=()):
    """preflight.json when no check failed; otherwise a PreflightError naming every failed check, and no
    output."""
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        raise PreflightError("preflight failed:\n" + "\n".join(f"  - {c.name}: {c.detail}" for c in failed))
    with atomic_outputs([path], run=run, inputs=inputs) as (tmp,):
        tmp.write_text(json.dumps({"checks": [asdict(c) for c in checks]}, indent=1, ensure_ascii=False) + "\n")
