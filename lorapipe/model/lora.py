"""LoRA adapters: adapter configs, the adapter tensors of a checkpoint, the scale, the fold.

LoRA adapters: the trained run's adapter_config.json, the adapter tensors of a checkpoint, and the
fold W' = W + (B @ A) * alpha / rank (PEFT's merge_and_unload, with its safe_merge check).

The scale comes from the adapter_config.json the finetune wrote from the YAML it trained with, never
from the current workflow config: editing lora.alpha after training must not silently rescale a
finished adapter.
"""

import math

import numpy as np

from lorapipe.errors import InputError
from lorapipe.formats.hf_io import read_json
from lorapipe.model.baichuan2 import LORA_A, LORA_B


def lora_scale(alpha, rank, rslora=False):
    """The factor B @ A is multiplied by: alpha / rank (rsLoRA, a PEFT option: alpha / sqrt(rank))."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def read_adapter_config(path):
    """{"r", "lora_alpha", "scaling", ...} of an adapter_config.json, checked."""
    adapter = read_json(path, "adapter config")
    if not isinstance(adapter, dict):
        raise InputError(f"{path}: expected a JSON object (a PEFT-style adapter config)")
    rank, alpha = adapter.get("r"), adapter.get("lora_alpha")
    if not (isinstance(rank, int) and rank > 0 and isinstance(alpha, (int, float)) and alpha > 0):
        raise InputError(f"{path}: expected a LoRA adapter config with a positive integer 'r' and a "
                         f"positive 'lora_alpha', found r={rank!r}, lora_alpha={alpha!r}")
    return dict(adapter, scaling=lora_scale(alpha, rank))


def pet_config_adapter(pet_config, where):
    """The adapter settings of a MindFormers YAML's model_config.pet_config, in adapter_config form."""
    if not pet_config or pet_config.get("pet_type") != "lora":
        raise InputError(f"{where}: has no LoRA pet_config")
    rank, alpha = pet_config.get("lora_rank"), pet_config.get("lora_alpha")
    return {"r": rank, "lora_alpha": alpha, "scaling": lora_scale(alpha, rank),
            "target_modules": pet_config.get("target_modules")}


def lora_pairs(names, where="checkpoint"):
    """{weight name: (lora_a name, lora_b name)} for the adapted cells among tensor `names`."""
    names = set(names)
    pairs = {}
    for name in sorted(names):
        if name.endswith("." + LORA_A):
            cell = name[: -len(LORA_A) - 1]
            if f"{cell}.{LORA_B}" not in names:
                raise InputError(f"{where}: tensor {name!r} has no matching {cell}.{LORA_B}")
            if f"{cell}.weight" not in names:
                raise InputError(f"{where}: LoRA adapter {name!r} has no base weight {cell}.weight")
            pairs[f"{cell}.weight"] = (name, f"{cell}.{LORA_B}")
        elif name.endswith("." + LORA_B) and f"{name[: -len(LORA_B) - 1]}.{LORA_A}" not in names:
            raise InputError(f"{where}: tensor {name!r} has no matching {LORA_A}")
    return pairs


def check_adapter_shapes(pairs, shapes, rank, where):
    """Every A is [rank, in] and every B is [out, rank] for its weight [out, in]."""
    for weight, (a, b) in pairs.items():
        out_dim, in_dim = shapes[weight]
        if tuple(shapes[a]) != (rank, in_dim) or tuple(shapes[b]) != (out_dim, rank):
            raise InputError(f"{where}: {a} is {tuple(shapes[a])} and {b} is {tuple(shapes[b])}; the adapter "
                             f"config's rank {rank} and the weight {tuple(shapes[weight])} need "
                             f"{(rank, in_dim)} and {(out_dim, rank)}")


def fold(weight, a, b, scaling, name="weight"):
    """W + (B @ A) * scaling, computed in fp32 and returned in W's dtype; a non-finite result (an fp16
    overflow, or a diverged adapter) is an error, not a silently broken model."""
    merged = weight.astype(np.float32) + (b.astype(np.float32) @ a.astype(np.float32)) * np.float32(scaling)
    with np.errstate(over="ignore"):  # checked just below
        merged = merged.astype(weight.dtype)
    if not np.isfinite(merged.astype(np.float32)).all():
        raise InputError(f"folding the LoRA adapter into {name} gives non-finite values in {weight.dtype}; "
                         f"the adapter diverged or the weight's dtype cannot hold the result")
    return merged
