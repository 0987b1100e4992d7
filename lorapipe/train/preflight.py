"""Preflight: on the host, without a device, check what would otherwise fail after every rank started.

Each check returns one Check (ok, warn, fail, or skipped with the reason). The network is built from the
rendered YAML the way MindFormers' trainer builds it (build_parallel_config + build_network, with LoRA),
under mindspore.nn.utils.no_init_parameters, so that a 7B network costs its parameter list, not its
weights. For semi-auto parallel YAMLs it is built under the same parallel context the ranks use, which
is when MindFormers' cells set their shard strategies.
"""

import contextlib
import glob
import json
import os
import re
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from lorapipe.model.tokenizer import ChatTokenizer
from lorapipe.errors import StepError
from lorapipe.formats.msckpt import checkpoint_index
from lorapipe.outputs import atomic_outputs, format_bytes
from lorapipe.train.ranktable import load_rank_table, read_hccn_conf
from lorapipe.model.architecture import LORA_A, LORA_B, is_alibi

GB = 1 << 30
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Primitives that need no strategy of their own (mindspore/ccsrc/frontend/parallel/step_parallel_utils.cc):
# a Cast without a strategy is not a "parallel care" node and takes its input's layout
# (IsParallelCareNode); Reshape and Shape follow their input's layout (ReshapeInfo).
LAYOUT_FOLLOWERS = {"Cast", "Reshape", "Shape"}
ASCEND_CARD_NOTE = "a 910B4 has 32 GB of HBM, a 910B1-B3 64 GB"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skipped
    detail: str


class PreflightError(StepError):
    """One or more checks failed; the message lists them."""


# -- the network, as the ranks build it ------------------------------------------------------------

def build_network(rendered_yaml):
    """(network, MindFormerConfig) for a rendered finetune YAML, parameters not allocated. Under
    semi-auto parallel the auto-parallel context is set as on the ranks (world size = dp * mp * pp,
    which MindFormers reads from the communication group: without init() on the host it is 1, so the
    planned size is reported instead)."""
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
    with no_init_parameters():
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


# -- the checks -------------------------------------------------------------------------------------

def ascend_devices():
    """Device ids of the Ascend NPUs on this host (/dev/davinci<N>)."""
    return sorted(int(m.group(1)) for p in glob.glob("/dev/davinci*") if (m := re.fullmatch(r".*davinci(\d+)", p)))


def check_devices(device_target, parallel):
    wanted = parallel["workers"]
    if device_target == "CPU" and parallel["launcher"] == "rank_table":
        return Check("devices", "fail", "parallel.launcher rank_table: on CPU, MindSpore's collectives are set up by "
                                        "msrun's scheduler (MS_SCHED_HOST/PORT, MS_ROLE), which ranks started from a "
                                        "rank table do not have; use msrun")
    if device_target == "CPU":
        return Check("devices", "ok", f"CPU: {wanted} ranks per node as processes on {os.cpu_count()} cores")
    if device_target != "Ascend":
        return Check("devices", "skipped", f"no device count check for {device_target}")
    found = ascend_devices()
    if not found:
        return Check("devices", "skipped", "no Ascend device on this host (/dev/davinci*); the ranks run elsewhere")
    visible = [int(d) for d in parallel["visible_devices"].split(",")][:wanted]
    absent = [d for d in visible if d not in found]
    if len(visible) < wanted or absent:
        return Check("devices", "fail", f"parallel.workers {wanted} on devices {visible}, but this host has "
                                        f"{found}" + (f" (no device {absent})" if absent else ""))
    return Check("devices", "ok", f"{wanted} of {len(found)} Ascend devices: {visible}")


def check_rank_table(rank_table, parallel, hccn_conf):
    if not rank_table:
        return Check("rank table", "skipped", f"launcher {parallel['launcher']} needs none")
    table = load_rank_table(rank_table)
    devices = [d for server in table["server_list"] for d in server["device"]]
    want = parallel["workers"] * parallel["nodes"]
    if len(devices) != want:
        return Check("rank table", "fail", f"{rank_table} lists {len(devices)} devices, parallel.workers x nodes "
                                           f"is {want}")
    if not Path(hccn_conf).is_file():
        return Check("rank table", "ok", f"{want} devices ({hccn_conf} not on this host to compare)")
    ips = read_hccn_conf(hccn_conf)
    wrong = [f"device {d['device_id']}: {d['device_ip']} (hccn.conf {ips.get(d['device_id'], 'none')})"
             for d in table["server_list"][0]["device"] if ips.get(d["device_id"]) != d["device_ip"]]
    if wrong:
        return Check("rank table", "fail", f"{rank_table} disagrees with {hccn_conf}: {'; '.join(wrong)}")
    return Check("rank table", "ok", f"{want} devices, IPs as in {hccn_conf}")


def check_layout(model_config, rendered):
    """The parallel layout against the network's widths, before the network is built: what MindFormers
    refuses with a traceback on every rank (or, for the vocabulary, accepts with a slower layout)."""
    par, cpu = rendered["parallel_config"], rendered["parallel"]["parallel_mode"] == 0
    mp, pp = par["model_parallel"], par["pipeline_stage"]
    problems = []
    if cpu and (mp > 1 or pp > 1):
        problems.append(f"parallel.model_parallel {mp} and pipeline_stage {pp}: lorapipe trains data parallel "
                        f"only on {rendered['context']['device_target']} (parallel_mode 0, no shard strategies); "
                        f"set both to 1")
    for what, size in (("hidden_size", model_config["hidden_size"]), ("num_heads", model_config["num_heads"]),
                       ("intermediate_size", model_config["intermediate_size"])):
        if size % mp:  # MindFormers: llama_layer.py:439-446 (FeedForward), modules/layers.py:681 (heads)
            problems.append(f"parallel.model_parallel {mp} does not divide the network's {what} {size}")
    if pp > model_config["num_layers"]:
        problems.append(f"parallel.pipeline_stage {pp} is more than the network's {model_config['num_layers']} "
                        f"layers: a stage would hold none")
    if problems:
        return Check("parallel layout", "fail", "; ".join(problems))
    if model_config["vocab_size"] % mp:  # models/llama/llama.py:527,544: then lm_head and the loss stay whole
        return Check("parallel layout", "warn", f"parallel.model_parallel {mp} does not divide vocab_size "
                                                f"{model_config['vocab_size']}: lm_head and the loss are not split "
                                                f"(every device computes all logits)")
    return Check("parallel layout", "ok", f"data {par['data_parallel']} x model {mp} x pipeline {pp}; widths and "
                                          f"{model_config['num_layers']} layers divide")


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


def check_positions(model_config, hf_config, allow_longer):
    """Rows longer than the positions the base model was trained on: RoPE angles (or ALiBi distances)
    it never saw. Refused unless data.allow_seq_length_over_max_positions says so."""
    limit = hf_config.get("model_max_length", hf_config.get("max_position_embeddings"))
    seq = model_config["seq_length"]
    if limit is None or seq <= limit:
        return Check("sequence length", "ok", f"data.seq_length {seq}" + (f" of the model's {limit} positions"
                                                                          if limit else " (the model names no limit)"))
    detail = (f"data.seq_length {seq} is more than the base model's {limit} positions (config.json "
              f"{'model_max_length' if 'model_max_length' in hf_config else 'max_position_embeddings'})")
    if allow_longer:
        return Check("sequence length", "warn", detail + "; allowed by data.allow_seq_length_over_max_positions")
    return Check("sequence length", "fail", detail + ": positions it never saw in training; set "
                                                     "data.allow_seq_length_over_max_positions: true to train anyway")


def build_network_check(rendered_yaml):
    """(network, None) or (None, a failed Check with MindFormers' own reason in one line)."""
    try:
        net, _ = build_network(rendered_yaml)
    except Exception as e:  # noqa: BLE001 - any refusal by MindFormers is this check's result
        reason = str(e).strip().splitlines()
        return None, Check("network", "fail", f"MindFormers cannot build the network: {type(e).__name__}: "
                                              f"{reason[-1] if reason else ''}")
    return net, None


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


def check_tokenizer(tokenizer, model_config):
    tok = ChatTokenizer(tokenizer)
    size, vocab = tok.sp.get_piece_size(), model_config["vocab_size"]
    if size > vocab:
        return Check("tokenizer", "fail", f"{tokenizer} has {size} pieces, the model's vocab_size is {vocab}: "
                                          f"ids >= {vocab} would index past the embedding")
    ids = (model_config.get("user_token_id"), model_config.get("assistant_token_id"))
    if ids != (None, None) and ids != (tok.user, tok.assistant):
        return Check("tokenizer", "fail", f"user/assistant token ids {ids} in the YAML, {tok.user, tok.assistant} in "
                                          f"{tokenizer}")
    note = "" if size == vocab else f" (the model's vocabulary has {vocab - size} unused rows)"
    return Check("tokenizer", "ok", f"{size} pieces, user/assistant ids {tok.user}/{tok.assistant}{note}")


def check_data(train_data, rendered):
    import mindspore.dataset as ds

    data = ds.MindDataset(str(train_data), shuffle=False)
    rows = data.get_dataset_size()
    # Packed rows need the network that reads their segment ids, and that network needs them: a MindRecord
    # from before a data.packing edit must not train with the other setting's YAML.
    columns, wanted = set(data.get_col_names()), set(rendered["train_dataset"]["input_columns"])
    packed = bool(rendered["model"]["model_config"].get("packing"))
    if columns != wanted or packed != ("segment_ids" in columns):
        return [Check("data", "fail", f"{train_data}: columns {sorted(columns)}, the YAML reads {sorted(wanted)} with "
                                      f"model_config.packing {packed}: data and YAML come from different "
                                      f"data.packing settings")]
    runner, par = rendered["runner_config"], rendered["parallel_config"]
    # as MindFormers computes it (trainer/base_trainer.py:224): micro batches only with pipeline stages
    micro = par["micro_batch_num"] if par["pipeline_stage"] > 1 else 1
    global_batch = runner["batch_size"] * par["data_parallel"] * micro
    steps = rows // global_batch  # drop_remainder
    if steps == 0:
        return [Check("data", "fail", f"{train_data}: {rows} rows give no full batch of train.batch_size "
                                      f"{runner['batch_size']} x data_parallel {par['data_parallel']}"
                                      + (f" x micro_batch_num {micro}" if micro > 1 else "") + f" = {global_batch}")]
    total = steps * runner["epochs"]
    if runner["sink_mode"] and total < runner["sink_size"]:
        return [Check("data", "fail", f"{total} steps, fewer than sink_size {runner['sink_size']}")]
    return [Check("data", "ok", f"{rows} {'packed ' if packed else ''}rows, global batch {global_batch}: "
                                f"{steps} steps per epoch, {total} in all"),
            check_schedule(rendered, total)]


def check_schedule(rendered, total):
    """Legal values that are unlikely to be what was meant: warnings, not failures."""
    lr, save = rendered["lr_schedule"], rendered["callbacks"][-1]["save_checkpoint_steps"]
    odd = []
    warmup = int(lr["warmup_ratio"] * total)
    if lr["warmup_ratio"] > 0 and warmup == 0:
        odd.append(f"train.lr_schedule.warmup_ratio {lr['warmup_ratio']} of {total} steps is no warmup step")
    if lr["warmup_ratio"] >= 0.5:
        odd.append(f"train.lr_schedule.warmup_ratio {lr['warmup_ratio']}: the rate rises for {warmup} of {total} "
                   f"steps and decays for {total - warmup}")
    if lr["learning_rate"] > 0.1:
        odd.append(f"train.lr_schedule.learning_rate {lr['learning_rate']} (LoRA usually trains at 1e-5 to 1e-2)")
    if save > total:
        odd.append(f"train.save_checkpoint_steps {save} > {total} steps: only the final checkpoint is saved, so a "
                   f"killed run restarts from step 0")
    if odd:
        return Check("schedule", "warn", "; ".join(odd))
    return Check("schedule", "ok", f"{total} steps, {warmup} of warmup, a checkpoint every {save}")


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


# -- the whole preflight ----------------------------------------------------------------------------

def run_preflight(rendered_yaml, base_ckpt, tokenizer, train_data, parallel, rank_table=None, hccn_conf=None,
                  hf_config=None, allow_longer=False):
    """All checks for a finetune, in order; never raises for a failed check (see report()). The checks
    that need the network are skipped when it cannot be built."""
    import yaml

    rendered = yaml.safe_load(Path(rendered_yaml).read_text())
    model_config = rendered["model"]["model_config"]
    device_target = rendered["context"]["device_target"]
    checks = [check_devices(device_target, parallel),
              check_rank_table(rank_table, parallel, hccn_conf or "/etc/hccn.conf"),
              check_layout(model_config, rendered)]
    net = None
    if checks[-1].status != "fail":
        net, failed = build_network_check(rendered_yaml)
        checks += [failed] if failed else []
    if net is not None:
        params = network_parameters(net)
        checks += [*check_checkpoint(params, base_ckpt, model_config["param_init_type"]),
                   check_lora(params, model_config)]
    else:
        checks.append(Check("network checks", "skipped", "checkpoint, LoRA, memory and shard strategies need the "
                                                         "network, which cannot be built with this layout"))
    checks.append(check_tokenizer(tokenizer, model_config))
    if hf_config is not None:
        checks.append(check_positions(model_config, hf_config, allow_longer))
    checks += check_data(train_data, rendered)
    if net is not None:
        checks += [check_memory(model_config, rendered, params, device_target), check_strategies(net, rendered)]
    return checks


def report(checks):
    """One table of the checks."""
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.name:<{width}}  {c.status:<7}  {c.detail}" for c in checks)


def write_report(checks, path, run=None, inputs=()):
    """preflight.json when no check failed; otherwise a PreflightError naming every failed check, and no
    output."""
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        raise PreflightError("preflight failed:\n" + "\n".join(f"  - {c.name}: {c.detail}" for c in failed))
    with atomic_outputs([path], run=run, inputs=inputs) as (tmp,):
        tmp.write_text(json.dumps({"checks": [asdict(c) for c in checks]}, indent=1, ensure_ascii=False) + "\n")


def check_devices_here(device_target, workers, visible_devices):
    """Stop before starting any rank when this host lacks the devices (every rank would fail with
    MindSpore's "Unsupported device target" dump instead)."""
    if device_target != "Ascend":
        return
    needed = [int(d) for d in (visible_devices or range(workers))][:workers]
    found = ascend_devices()
    if not set(needed) <= set(found):
        have = f"Ascend devices {found}" if found else "no Ascend device (/dev/davinci*)"
        raise StepError(f"device_target Ascend needs devices {needed}, but this host ({socket.gethostname()}) has "
                        f"{have}: run finetune on an NPU node (profiles/slurm sends it to the ascend partition)")
