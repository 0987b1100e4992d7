"""The network as the ranks build it, built on the host without weights, and the checks that need it.

The checks: the checkpoint against its parameters, LoRA, memory per device, shard strategies.

The network is built from the rendered YAML the way MindFormers' trainer builds it (build_parallel_config +
build_network, with LoRA), under mindspore.nn.utils.no_init_parameters, so that a 7B network costs its
parameter list, not its weights. For semi-auto parallel YAMLs it is built under the same parallel context
the ranks use, which is when MindFormers' cells set their shard strategies.
"""

import contextlib
import math
import os
import re
import subprocess

from lorapipe.formats.checkpoint_file import checkpoint_index
from lorapipe.model.architecture import is_alibi
from lorapipe.model.baichuan2 import LORA_A, LORA_B
from lorapipe.outputs import format_bytes
from lorapipe.train.checks import Check
from lorapipe.train.mindformers_yaml import CHECKPOINT_PARAMS

GB = 1 << 30


BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# Primitives that need no strategy of their own (mindspore/ccsrc/frontend/parallel/step_parallel_utils.cc):
# a Cast without a strategy is not a "parallel care" node and takes its input's layout
# (IsParallelCareNode); Reshape and Shape follow their input's layout (ReshapeInfo).
LAYOUT_FOLLOWERS = {"Cast", "Reshape", "Shape"}


ASCEND_CARD_NOTE = "a 910B4 has 32 GB of HBM, a 910B1-B3 64 GB"


def build_network(rendered_yaml, allocate=False):
    """(network, MindFormerConfig) for a rendered finetune YAML, parameters not allocated. Under
    semi-auto parallel the auto-parallel context is set as on the ranks (world size = dp * mp * pp,
    which MindFormers reads from the communication group: without init() on the host it is 1, so the
    planned size is reported instead). With `allocate` the parameters are initialised (the trial step)."""
    import mindformers.modules.transformer.op_parallel_config as op_parallel_config
    import mindspore as ms
    from mindformers import MindFormerConfig
    from mindformers.core.parallel_config import build_parallel_config
    from mindformers.models.build_model import build_network as mf_build_network
    from mindspore.nn.utils import no_init_parameters

    import lorapipe.model.network  # noqa: F401  registers Baichuan2ForCausalLM

    cfg = MindFormerConfig(os.path.abspath(rendered_yaml))
    par = cfg.parallel_config
    world = par.data_parallel * par.model_parallel * par.pipeline_stage
    if cfg.parallel.parallel_mode == 1:
        ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel", device_num=world, global_rank=0,
                                     full_batch=cfg.parallel.full_batch)
        op_parallel_config.D.get_group_size = lambda *args, **kwargs: world
    build_parallel_config(cfg)
    with contextlib.nullcontext() if allocate else no_init_parameters():
        net = mf_build_network(cfg.model, default_args={"parallel_config": cfg.parallel_config,
                                                        "moe_config": cfg.moe_config})
    return net, cfg


def network_parameters(net):
    """{name: (shape, dtype name)} of a built network (no data read)."""
    return {p.name: (tuple(p.shape), str(p.dtype).lower()) for p in net.get_parameters()}


def unsharded_ops(net):
    """[(cell, attribute, primitive)] for every primitive of a cell that owns parameters which has no
    shard strategy and does not merely follow its input's layout."""
    from mindspore.ops.primitive import Primitive

    missing = []
    for cell_name, cell in net.cells_and_names():
        if not cell._params:  # noqa: SLF001 - a cell's own parameters, MindSpore's attribute
            continue
        for attr, prim in vars(cell).items():
            if isinstance(prim, Primitive) and prim.name not in LAYOUT_FOLLOWERS and not prim.attrs.get("in_strategy"):
                missing.append((cell_name, attr, prim.name))
    return missing


def strategy_of(net, cell_suffix, attr):
    """The in_strategy of primitive `attr` in the cell whose name ends with `cell_suffix`."""
    for name, cell in net.cells_and_names():
        if name.endswith(cell_suffix):
            return getattr(cell, attr).attrs.get("in_strategy")
    raise KeyError(cell_suffix)


def build_network_check(rendered_yaml):
    """(network, None) or (None, a failed Check with MindFormers' own reason in one line)."""
    try:
        net, _ = build_network(rendered_yaml)
    except Exception as e:  # noqa: BLE001 - any refusal by MindFormers is this check's result
        reason = str(e).strip().splitlines()
        return None, Check("network", "fail", f"MindFormers cannot build the network: {type(e).__name__}: "
                                              f"{reason[-1] if reason else ''}")
    return net, None


def check_lora(params, model_config):
    """LoRA targets that match no cell leave nothing to train (MindFormers' pet wrapper then fails on
    every rank); say how many parameters train."""
    target = model_config["pet_config"]["target_modules"]
    lora = {n: shape for n, (shape, _) in params.items() if n.endswith((LORA_A, LORA_B))}
    if not lora:
        cells = sorted({n.rsplit(".", 1)[0].split(".", 3)[-1] for n, (shape, _) in params.items() if len(shape) == 2})
        return Check("lora", "fail", f"lora.target_modules {target!r} matches no cell of the network; its 2-D weights "
                                     f"are in {', '.join(cells)} (the recipe's is '.*wq|.*wk|.*wv')")
    cells = sorted({n.rsplit(".", 1)[0] for n in lora})
    trainable = sum(_numel(shape) for shape in lora.values())
    total = sum(_numel(shape) for shape, _ in params.values())
    kinds = sorted({c.split(".", 3)[-1] for c in cells})
    return Check("lora", "ok", f"{len(cells)} cells ({', '.join(kinds)}): {trainable:,} trainable values, "
                               f"{100 * trainable / total:.3g}% of {total:,}")


def check_checkpoint(params, base_ckpt, param_init_type):
    """The converted checkpoint against the network's parameters: names, shapes, dtypes (LoRA
    parameters are trained from their initialisation, not loaded)."""
    index = {name: (tuple(shape), type_name.lower()) for name, type_name, shape in checkpoint_index(base_ckpt)}
    base = {n: v for n, v in params.items() if not n.endswith((LORA_A, LORA_B))}
    missing = [n for n in base if n not in index]
    unexpected = [n for n in index if n not in base]
    misshapen = [f"{n} {index[n][0]} (network {base[n][0]})" for n in base if n in index and index[n][0] != base[n][0]]
    problems = [f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for what, names in
                (("missing", missing), ("not in the network", unexpected), ("wrong shape", misshapen)) if names]
    checks = [Check("checkpoint", "fail", f"{base_ckpt}: " + "; ".join(problems)) if problems else
              Check("checkpoint", "ok", f"{len(base)} parameters, names and shapes as the network's "
                                        f"({len(params) - len(base)} LoRA parameters trained from init)")]
    dtypes = sorted({dtype for _, dtype in index.values()})
    if dtypes != [param_init_type]:
        checks.append(Check("checkpoint dtype", "warn",
                            f"{base_ckpt} holds {', '.join(dtypes)}, param_init_type is {param_init_type}: every "
                            f"rank converts at load (the official converter writes float16; base_model.dtype "
                            f"sets it)"))
    else:
        checks.append(Check("checkpoint dtype", "ok", param_init_type))
    return checks


def device_memory(model_config, rendered, params):
    """Estimated bytes one device holds while training: frozen weights, LoRA weights with their gradients
    and AdamW state, activations, and the logits. Activations follow Korthikanti et al. 2022 (s*b*h*
    (34 + 5*a*s/h) bytes for one layer's in 16-bit); with recompute only each layer's input is kept, plus
    one layer's activations during its backward."""
    par = rendered["parallel_config"]
    mp, pp = par["model_parallel"], par["pipeline_stage"]
    weight_bytes = BYTES[model_config["param_init_type"]]
    act_bytes = BYTES[model_config["compute_dtype"]]
    lora = sum(_numel(shape) for name, (shape, _) in params.items() if name.endswith((LORA_A, LORA_B)))
    frozen = sum(_numel(shape) for shape, _ in params.values()) - lora
    b, s = rendered["runner_config"]["batch_size"], model_config["seq_length"]
    h, a, v = model_config["hidden_size"], model_config["num_heads"], model_config["vocab_size"]
    layers = model_config["num_layers"] // pp
    one_layer = s * b * h * (34 + 5 * a * s / h) * act_bytes / 2 / mp
    recompute = rendered["recompute_config"]["recompute"]
    parts = {
        "weights": frozen * weight_bytes / mp / pp,
        "lora + grads + AdamW": lora * (weight_bytes + 4 + 8),
        "activations": (layers * s * b * h * act_bytes + one_layer) if recompute else layers * one_layer,
        "logits": b * s * v * (act_bytes + 4) / mp,  # the logits and their fp32 softmax
    }
    if is_alibi(model_config):
        # lorapipe.model.network.CausalMaskWithAlibi: the fp32 distances [s, s], slopes x distances in fp32 and in the
        # compute dtype [1, a/mp, s, s], and the mask plus bias [b, a/mp, s, s] that every layer reads.
        parts["ALiBi bias"] = s * s * 4 + a // mp * s * s * (4 + act_bytes + b * act_bytes)
    return parts


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def check_saves(params, rendered):
    """What one save point writes per rank (params at their dtypes, Adam's two fp32 moments for the trained
    ones), and the MindFormers keys the checkpoint settings render."""
    kind, fmt = rendered.get(CHECKPOINT_PARAMS, "all"), rendered["load_ckpt_format"]
    trained = [v for n, v in params.items() if n.endswith((LORA_A, LORA_B))]
    frozen = [v for n, v in params.items() if not n.endswith((LORA_A, LORA_B))]
    trainable = sum(math.prod(shape) * (BYTES[dtype] + 8) for shape, dtype in trained)
    whole = trainable + sum(math.prod(shape) * BYTES[dtype] for shape, dtype in frozen)
    saved = trainable if kind == "trainable" else whole
    other = f"; all would write {format_bytes(whole)}" if kind == "trainable" else \
        f"; trainable would write {format_bytes(trainable)}"
    return Check("checkpoints", "ok", f"about {format_bytes(saved)} per rank and save point{other} "
                                      f"(train.checkpoint_params {kind}: lorapipe_checkpoint_params; checkpoint.format "
                                      f"{fmt}: load_ckpt_format and CheckpointMonitor's checkpoint_format)")


def check_memory(model_config, rendered, params, device_target):
    parts = device_memory(model_config, rendered, params)
    total = sum(parts.values())
    detail = (f"about {format_bytes(total)} per device ("
              + ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items()) + ")")
    limit = rendered["context"].get("max_device_memory")
    if device_target != "Ascend":
        return Check("memory", "ok", detail + f"; {device_target} has no device memory limit")
    if not limit:
        return Check("memory", "warn", detail + "; context.max_device_memory is not set")
    limit_bytes = int(limit[:-2]) * GB
    card = ascend_card_memory()
    if total > limit_bytes:
        return Check("memory", "fail", detail + f", more than max_device_memory {limit}")
    if card is None:
        return Check("memory", "ok", detail + f" of max_device_memory {limit} (card memory unknown on this host: "
                                              f"{ASCEND_CARD_NOTE})")
    if limit_bytes > card:
        return Check("memory", "warn", detail + f"; max_device_memory {limit} exceeds the card's {card / GB:.0f} GB")
    return Check("memory", "ok", detail + f" of max_device_memory {limit} (card {card / GB:.0f} GB)")


def ascend_card_memory():
    """HBM bytes of device 0 from `npu-smi info`, or None where there is no NPU or no npu-smi."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["npu-smi", "info"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"(\d+)\s*/\s*(\d+)\s*\|?\s*$", out, re.M)  # "HBM-Usage(MB)  used / total"
        if match:
            return int(match.group(2)) << 20
    return None


def check_strategies(net, rendered):
    if rendered["parallel"]["parallel_mode"] != 1:
        return Check("shard strategies", "skipped", "data parallel: every rank holds the whole network")
    missing = unsharded_ops(net)
    if missing:
        return Check("shard strategies", "fail", "ops on parameters without a shard strategy (MindSpore would split "
                                                 "their first input over all devices): "
                     + ", ".join(f"{c}.{a} ({p})" for c, a, p in missing[:5]))
    head = strategy_of(net, "lm_head", "l2_normalize")
    return Check("shard strategies", "ok", f"every op on a parameter has a strategy or follows its input's layout; "
                                           f"lm_head L2Normalize {head}")
