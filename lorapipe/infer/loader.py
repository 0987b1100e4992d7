"""The model a run trained, as predict sees it: YAML, checkpoints, adapter, tokenizer, device.

In full: the rendered YAML's model_config, the complete checkpoints (a file, or a folder holding
rank_0/), the LoRA settings to fold their LoRA tensors with, the tokenizer and the device; and the
loaders that build it (the host KV-cache decoder, or the MindSpore network).

Every checkpoint is loaded through load_weights, which checks it against the network and folds LoRA tensors
with the trained run's scale. predict, chat, evaluate and the benchmark tasks load through trained_model.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from lorapipe.errors import InputError
from lorapipe.formats.checkpoint_file import checkpoint_index, iter_checkpoint
from lorapipe.model.architecture import is_alibi
from lorapipe.model.baichuan2 import network_shapes
from lorapipe.model.decode import KVCacheDecoder
from lorapipe.model.lora import (
    check_adapter_shapes,
    fold,
    lora_pairs,
    pet_config_adapter,
    read_adapter_config,
)
from lorapipe.train.mindformers_yaml import read_mindformers_yaml
from lorapipe.weights.checkpoints import rank_checkpoints

log = logging.getLogger("lorapipe")


def tokenizer_file(rendered, override, where):
    """The tokenizer: `override` (--vocab_file), else the YAML's processor.tokenizer.vocab_file."""
    path = override or (rendered.get("processor") or {}).get("tokenizer", {}).get("vocab_file")
    if not path:
        raise InputError(f"{where}: has no processor.tokenizer.vocab_file; pass --vocab_file")
    return path


def complete_checkpoint(path):
    """The complete checkpoint `--load_checkpoint` names: a .ckpt file, or (MindFormers' layout) a
    folder holding rank_0/ with one checkpoint. A folder of several ranks is a distributed checkpoint:
    merge it first."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"{path}: no such checkpoint file or folder")
    ckpts = rank_checkpoints(path)
    if len(ckpts) > 1:
        raise InputError(f"{path}: holds {len(ckpts)} rank folders, a distributed checkpoint; merge it into one "
                         f"first (snakemake merged_ckpt, or scripts/transform_ckpt.py)")
    return ckpts[0]


def read_adapter(adapter_config, model_config, where):
    """The LoRA settings to fold with: the adapter_config.json given, else the YAML's pet_config, else
    None (a checkpoint with LoRA tensors is then refused by load_model)."""
    if adapter_config:
        return read_adapter_config(adapter_config)
    if model_config.get("pet_config"):
        return pet_config_adapter(model_config["pet_config"], where)
    return None


def load_weights(model_config, ckpt, adapter=None):
    """{parameter name: array} of a complete checkpoint for the Baichuan2 network `model_config`
    describes (a rendered YAML's model_config), checked name by name and shape by shape.

    A checkpoint that holds LoRA tensors (merged_ckpt, as the recipe predicts from) is folded with
    `adapter` (the trained run's settings, lorapipe.model.lora.read_adapter_config), which it then needs. A
    tensor the model does not have, or a parameter the checkpoint lacks, is an error: nothing is dropped
    silently."""
    if not Path(ckpt).is_file():
        raise InputError(f"{ckpt}: checkpoint not found")
    index = checkpoint_index(ckpt)
    shapes = {name: shape for name, _, shape in index}
    pairs = lora_pairs(shapes, ckpt)
    if pairs:
        if adapter is None:
            raise InputError(f"{ckpt}: holds LoRA adapters ({pairs[next(iter(pairs))][0]} ...) but no adapter "
                             f"config says how to scale them; pass --adapter_config <finetune>/adapter_config.json "
                             f"(or a YAML with model_config.pet_config), or load the folded merged_lora checkpoint")
        check_adapter_shapes(pairs, shapes, adapter["r"], ckpt)
    expected = network_shapes(model_config)
    adapters = {n for pair in pairs.values() for n in pair}
    unexpected = [n for n in shapes if n not in expected and n not in adapters]
    missing = [n for n in expected if n not in shapes]
    misshapen = [f"{n} {tuple(shapes[n])} (expected {s})" for n, s in expected.items()
                 if n in shapes and tuple(shapes[n]) != s]
    problems = [f"{what}: {_some(names)}" for what, names in (("tensors the model does not have", unexpected),
                                                             ("parameters it lacks", missing),
                                                             ("tensors of the wrong shape", misshapen)) if names]
    if problems:
        raise InputError(f"{ckpt}: not a complete Baichuan2 checkpoint for this model ({'; '.join(problems)})")
    lora = dict(iter_checkpoint(ckpt, select=adapters.__contains__))
    weights = {}
    for name, array in iter_checkpoint(ckpt, select=lambda n: n not in adapters, hashed=True):
        weights[name] = fold(array, lora[pairs[name][0]], lora[pairs[name][1]], adapter["scaling"], name) \
            if name in pairs else array
    if pairs:
        log.info("%s: folded %d LoRA adapters on load (scale %s)", ckpt, len(pairs), adapter["scaling"])
    return weights


def _some(names, shown=3):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def load_model(model_config, ckpt, adapter=None, use_past=False):
    """The Baichuan2 MindSpore network (eval mode) with load_weights(...) in it; use_past builds
    MindFormers' incremental network (paged attention: Ascend kernels only)."""
    import mindspore as ms

    from lorapipe.model.network import build_model

    weights = load_weights(model_config, ckpt, adapter)
    net = build_model({k: v for k, v in model_config.items() if k not in ("pet_config", "checkpoint_name_or_path")
                       } | {"use_past": use_past})
    not_loaded, _ = ms.load_param_into_net(net, {n: ms.Parameter(ms.Tensor(a), name=n) for n, a in weights.items()})
    if [n for n in not_loaded if "cache" not in n]:  # use_past adds its key/value cache parameters
        raise InputError(f"{ckpt}: the network has parameters the checkpoint does not: {_some(not_loaded)}")
    return net


def use_device(rendered, mode=None, device_id=None):
    """MindSpore's device from a rendered YAML's context (the recipe's --mode and --device_id override
    it); returns the device target. The host (CPU) decodes in PyNative, MindSpore's default."""
    import mindspore as ms

    context = rendered.get("context") or {}
    target = context.get("device_target", "CPU")
    if target != "CPU":
        ms.set_context(device_target=target, mode=context.get("mode", 0) if mode is None else mode,
                       **({} if device_id is None else {"device_id": device_id}))
    return target


def on_device(model, **overrides):
    """(device target, the model_config to compute with) on the device the rendered YAML's context names
    (use_device): on the host in fp32, whatever dtypes it trained in; on a device in those dtypes.
    `overrides` replace model_config keys."""
    target, config = use_device(model.rendered), {**model.model_config, **overrides}
    if target == "CPU":
        config.update(compute_dtype="float32", param_init_type="float32")
    return target, config


def build_decoder(model_config, ckpt, adapter=None, use_past=True, device_target="CPU"):
    """What predict and chat decode with: on the host with use_past, the KV-cache decoder; on Ascend,
    MindFormers' use_past network; without use_past, the plain network (full recompute). An ALiBi model
    (Baichuan2-13B) on Ascend decodes with the plain network: MindFormers 1.9's use_past path for LLaMA
    applies rotary embeddings and no ALiBi bias (models/llama/llama.py:353-370, llama_transformer.py:494-496)."""
    if use_past and device_target == "CPU":
        return KVCacheDecoder(load_weights(model_config, ckpt, adapter), model_config)
    if use_past and is_alibi(model_config):
        log.warning("ALiBi model on %s: MindFormers has no incremental ALiBi path for this network; decoding "
                    "re-runs the whole sequence for every new token", device_target)
        use_past = False
    return load_model(model_config, ckpt, adapter, use_past=use_past)


@dataclass
class TrainedModel:
    """The model a run trained, as predict sees it. `checkpoints` are the complete checkpoints to load,
    {label: path} ("finetuned", and "base" to compare); `adapter` the LoRA settings their LoRA tensors are
    folded with (None: the checkpoints must hold none); `rendered` the whole YAML (context, processor)."""
    rendered: dict
    model_config: dict
    checkpoints: dict
    adapter: dict | None
    tokenizer: str


def trained_model(config, load_checkpoint, compare_checkpoint=None, adapter_config=None, vocab_file=None,
                  **model_config_overrides):
    """The one place that resolves a trained model from the flags predict, chat and evaluate share: the
    rendered YAML (`--config`), the checkpoint (`--load_checkpoint`, and `--compare_checkpoint`), the
    adapter (`--adapter_config`, else the YAML's pet_config) and the tokenizer (`--vocab_file`, else the
    YAML's). `model_config_overrides` replace model_config keys (seq_length; evaluate's fp32 on the host)."""
    rendered = read_mindformers_yaml(config)
    model_config = {**rendered["model"]["model_config"],
                    **{k: v for k, v in model_config_overrides.items() if v is not None}}
    checkpoints = {"finetuned": complete_checkpoint(load_checkpoint)}
    if compare_checkpoint:
        checkpoints["base"] = complete_checkpoint(compare_checkpoint)
    return TrainedModel(rendered, model_config, checkpoints, read_adapter(adapter_config, model_config, config),
                        tokenizer_file(rendered, vocab_file, config))
