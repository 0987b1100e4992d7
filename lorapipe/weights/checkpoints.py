"""Training checkpoints -> one deployable model: filter, merge, fold LoRA.

All of it streams through lorapipe.formats.msckpt: a 7B checkpoint with Adam state is ~90 GB, so nothing here
ever holds a whole checkpoint in memory (merging with strategy files excepted: that is MindSpore's
transform_checkpoints, which needs the shards of each tensor together).
"""

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from lorapipe.digests import copy_bytes, link_or_copy
from lorapipe.errors import InputError
from lorapipe.formats.checkpoint_file import (
    checkpoint_index,
    checkpoint_writer,
    iter_checkpoint,
    the_checkpoint,
)
from lorapipe.formats.msckpt import PARAMETER_ORDER, numpy_dtype
from lorapipe.model.baichuan2 import LORA_A, LORA_B
from lorapipe.model.lora import (
    check_adapter_shapes,
    fold,
    lora_pairs,
    read_adapter_config,
)
from lorapipe.outputs import atomic_outputs
from lorapipe.progress import Progress

log = logging.getLogger("lorapipe")

# Training state that is not a network parameter, by exact name or exact prefix (the recipe's
# filter_ckpt_param.py list plus global_batch_size). Substrings are never enough: a parameter whose
# name merely contains "adam" is kept.
BOOKKEEPING = frozenset({"global_step", "epoch_num", "step_num", "loss_scale", "scale_sense",
                         "current_iterator_step", "last_overflow_iterator_step", "global_batch_size"})
OPTIMIZER_STATE_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "moment1.", "moment2.", "exp_avg.",
                            "exp_avg_sq.")


def is_model_parameter(name):
    """True for a network parameter. False for bookkeeping, optimizer state, and any other top-level
    entry: every network parameter lives under a cell path (`model.`, `lm_head.`), training state
    such as counters and learning rates does not."""
    return name not in BOOKKEEPING and not name.startswith(OPTIMIZER_STATE_PREFIXES) and "." in name


def filter_checkpoint(src, dst, run=None):
    """Copy only the network parameters of `src` to `dst`, one tensor at a time; returns the names
    dropped."""
    with atomic_outputs([dst], run=run, inputs=[src], hashed_inline=[src], need_bytes=_kept_bytes(src)) as (tmp,):
        return _filter_into(src, tmp)


def merge_data_parallel(rank_ckpts, dst, run=None):
    """Under pure data parallel every rank holds the whole model: check that all ranks agree tensor
    for tensor (streaming them side by side), then take rank 0's."""
    if not rank_ckpts:
        raise InputError("no rank checkpoints to merge")
    indexes = [checkpoint_index(p) for p in rank_ckpts]
    for path, index in zip(rank_ckpts[1:], indexes[1:]):
        if [n for n, _, _ in index] != [n for n, _, _ in indexes[0]]:
            missing = sorted({n for n, _, _ in indexes[0]} ^ {n for n, _, _ in index})
            raise InputError(f"{path}: holds different tensors than {rank_ckpts[0]} (e.g. {missing[:3]})")
    progress = Progress("compare ranks", len(indexes[0]), unit="tensors")
    for i, tensors in enumerate(zip(*(iter_checkpoint(p, hashed=True) for p in rank_ckpts))):
        (name, first), rest = tensors[0], tensors[1:]
        for path, (_, array) in zip(rank_ckpts[1:], rest):
            if array.dtype != first.dtype or array.shape != first.shape or array.tobytes() != first.tobytes():
                raise InputError(f"{path}: tensor {name!r} differs from rank 0's ({rank_ckpts[0]}); data-"
                                 f"parallel ranks must agree (was this trained with model parallel?)")
        progress.update(i + 1)
    with atomic_outputs([dst], run=run, inputs=list(rank_ckpts), hashed_inline=rank_ckpts,
                        need_bytes=copy_bytes(rank_ckpts[0], Path(dst).parent)) as (tmp,):
        link_or_copy(rank_ckpts[0], tmp)


def complete_with_base(trained, order_file, base, dst, run=None, inputs=None):
    """The complete model from a checkpoint of the trainable parameters only (train.checkpoint_params:
    trainable) and the base they were trained on: every network parameter in the order, and with the
    dtype, of the network that saved them (PARAMETER_ORDER), the trained ones from `trained`, the frozen
    ones from `base` (cast as MindSpore casts a checkpoint on load). The same bytes as merging a checkpoint
    that held the whole network. Streams: at most one layer's base tensors in memory (the base file and the
    network order their layers' tensors differently)."""
    import json

    order = [(name, dtype) for name, dtype in json.loads(Path(order_file).read_text()) if is_model_parameter(name)]
    trained_index = {name: shape for name, _, shape in checkpoint_index(trained)}
    trained_names = set(trained_index)
    base_index = {name: shape for name, _, shape in checkpoint_index(base)}
    missing = [name for name, _ in order if name not in trained_names and name not in base_index]
    if missing:
        raise InputError(f"{base}: lacks {len(missing)} frozen parameters the training network has ({missing[:3]} "
                         f"...); is it the base this run trained on?")
    trained_arrays = dict(iter_checkpoint(trained, select=trained_names.__contains__))  # small: LoRA tensors
    base_arrays = iter_checkpoint(base, select=lambda n: n not in trained_names, hashed=True)
    progress = Progress("add the base", len(order), unit="tensors")
    # `inputs`: what the manifest names for `trained` (the rank files it was merged from; default itself)
    with atomic_outputs([dst], run=run, inputs=[*(inputs or [trained]), order_file, base], hashed_inline=[base],
                        need_bytes=2 * os.path.getsize(base)) as (tmp,), \
            checkpoint_writer(tmp, [(name, numpy_dtype(dtype), trained_index.get(name, base_index.get(name)))
                                    for name, dtype in order]) as writer:
        pending = {}
        for done, (name, dtype) in enumerate(order):
            if name in trained_arrays:
                array = trained_arrays[name]
            else:  # the base file's order may differ from the network's: read ahead to the one needed
                while name not in pending:
                    got, array = next(base_arrays)
                    pending[got] = array
                array = pending.pop(name).astype(numpy_dtype(dtype), copy=False)
            writer.add(name, array)
            progress.update(done + 1)
    return dst


def fold_lora(src, dst, adapter_config, run=None):
    """W += (B @ A) * alpha / rank for every adapted weight, with the rank and alpha of the run that
    trained the adapter (its adapter_config.json) -> a checkpoint with no LoRA tensors, loadable by the
    plain model (peft's merge_and_unload). Streams: one weight in memory at a time."""
    adapter = read_adapter_config(adapter_config)
    index = checkpoint_index(src)
    pairs = lora_pairs([name for name, _, _ in index], src)
    if not pairs:
        raise InputError(f"{src}: no LoRA tensors ({LORA_A}/{LORA_B}) to fold")
    check_adapter_shapes(pairs, {name: shape for name, _, shape in index}, adapter["r"], src)
    adapter_names = {n for pair in pairs.values() for n in pair}
    adapters = dict(iter_checkpoint(src, select=adapter_names.__contains__))  # small: rank x hidden each
    progress = Progress("fold", len(index) - len(adapter_names), unit="tensors")
    with atomic_outputs([dst], run=run, inputs=[src, adapter_config], hashed_inline=[src],
                        need_bytes=os.path.getsize(src)) as (tmp,), \
            checkpoint_writer(tmp, [(n, numpy_dtype(t), shape) for n, t, shape in index if n not in adapter_names]) \
            as writer:
        for done, (name, array) in enumerate(iter_checkpoint(src, select=lambda n: n not in adapter_names,
                                                             hashed=True)):
            if name in pairs:
                a, b = (adapters[n] for n in pairs[name])
                array = fold(array, a, b, adapter["scaling"], name)
            writer.add(name, array)
            progress.update(done + 1)
    log.info("folded %d LoRA adapters with scale lora_alpha/r = %s/%s = %s (from %s)", len(pairs),
             adapter["lora_alpha"], adapter["r"], adapter["scaling"], adapter_config)
    return sorted(pairs)


def rank_checkpoints(src_dir, ranks=None):
    """[rank_0 ckpt, rank_1 ckpt, ...] of a folder of rank_<r>/ sub-folders with one checkpoint each.
    With `ranks`, exactly that many ranks must be there."""
    src_dir = Path(src_dir)
    found = {}
    for folder in src_dir.glob("rank_*"):
        if folder.name[5:].isdigit():
            found[int(folder.name[5:])] = the_checkpoint(folder)
    count = ranks if ranks is not None else (max(found) + 1 if found else 0)
    missing = [f"rank_{r}" for r in range(count) if r not in found]
    if not found or missing:
        raise InputError(f"{src_dir}: missing {', '.join(missing) or 'rank_0'} (expected rank_0 .. rank_{count - 1})")
    extra = sorted(r for r in found if r >= count)
    if extra:
        raise InputError(f"{src_dir}: has rank_{extra[0]}, but only {count} ranks were expected")
    return [found[r] for r in range(count)]


def filter_checkpoint_dir(src_dir, dst_dir, run=None):
    """filter_checkpoint for every rank_<r>/*.ckpt of src_dir -> dst_dir/rank_<r>/ (strategy/ kept)."""
    ckpts = rank_checkpoints(src_dir)
    with atomic_outputs([dst_dir], run=run, inputs=ckpts, hashed_inline=ckpts,
                        need_bytes=sum(_kept_bytes(c) for c in ckpts)) as (tmp,):
        for ckpt in ckpts:
            (tmp / ckpt.parent.name).mkdir(parents=True)
            _filter_into(ckpt, tmp / ckpt.parent.name / ckpt.name)
            if (ckpt.parent / PARAMETER_ORDER).is_file():
                shutil.copyfile(ckpt.parent / PARAMETER_ORDER, tmp / ckpt.parent.name / PARAMETER_ORDER)
        if (Path(src_dir) / "strategy").is_dir():
            shutil.copytree(Path(src_dir) / "strategy", tmp / "strategy")
    return dst_dir


def _kept_bytes(src):
    """The bytes of the network parameters in a checkpoint: what filtering writes."""
    return sum(int(np.prod(shape)) * numpy_dtype(type_name).itemsize
               for name, type_name, shape in checkpoint_index(src) if is_model_parameter(name))


def _filter_into(src, dst):
    index = checkpoint_index(src)
    dropped = [name for name, _, _ in index if not is_model_parameter(name)]
    kept = len(index) - len(dropped)
    if not kept:
        raise InputError(f"{src}: no network parameters in it (only {', '.join(dropped[:5])} ...)")
    progress = Progress(f"filter {Path(src).parent.name}", kept, unit="tensors")
    plan = [(name, numpy_dtype(type_name), shape) for name, type_name, shape in index if is_model_parameter(name)]
    with checkpoint_writer(dst, plan) as writer:
        for i, (name, array) in enumerate(iter_checkpoint(src, select=is_model_parameter, hashed=True)):
            writer.add(name, array)
            progress.update(i + 1)
    log.info("%s: kept %d parameters, dropped %d entries (%s)", src, kept, len(dropped),
             ", ".join(sorted({d.split(".")[0] for d in dropped})))
    return dropped


def transform_with_strategy(src_dir, dst_ckpt, strategy, prefix="checkpoint_", run=None):
    """Merge model-parallel shards into one complete checkpoint with MindSpore's transform_checkpoints;
    a strategy folder (one file per pipeline stage or rank) is merged into one file first."""
    import tempfile

    import mindspore as ms

    ckpts = rank_checkpoints(src_dir)
    strategy = Path(strategy)
    with tempfile.TemporaryDirectory(prefix="lorapipe-transform-") as work, \
            atomic_outputs([dst_ckpt], run=run, inputs=[*ckpts, strategy]) as (tmp,):
        work = Path(work)
        if strategy.is_dir():
            merged_strategy = work / "merged_strategy.ckpt"
            ms.merge_pipeline_strategys(str(strategy), str(merged_strategy))
            strategy = merged_strategy
        ms.transform_checkpoints(str(src_dir), str(work / "out"), prefix, str(strategy), None)
        produced = sorted((work / "out").rglob("*.ckpt"))
        if len(produced) != 1:
            raise InputError(f"transform_checkpoints wrote {len(produced)} checkpoints, expected one")
        shutil.move(produced[0], tmp)
