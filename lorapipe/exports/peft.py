"""The trained LoRA adapter as PEFT folders, and PEFT adapters back in.

* export_peft: the trained LoRA tensors (merged_ckpt, unfolded) -> a standard PEFT adapter for the
  Llama layout (exports.llama), and the same adapter for Baichuan2's own W_pack layout.
* import_peft: a PEFT LoRA adapter for either layout -> a MindSpore LoRA checkpoint with its
  adapter_config.json (what fold_lora, predict and evaluate take), or the base checkpoint with it folded.

LoRA is the same in MindFormers (mindpet) and PEFT: A [r, in], B [out, r], W' = W + (B @ A) * alpha / r.

The W_pack layout. W_pack = [Wq; Wk; Wv] by rows, so LoRA of rank r on each of q, k, v is exactly one
LoRA of rank 3r on W_pack with A = [Aq; Ak; Av] (stacked rows) and B = blockdiag(Bq, Bk, Bv), since
B @ A = [Bq Aq; Bk Ak; Bv Av]; writing lora_alpha 3 * alpha keeps the scale alpha / r. Going back, any
W_pack adapter of rank R is rank R on each of wq, wk, wv (all of A, B's row block); a block-diagonal one
(as written here) comes back at rank R / 3 with the original tensors.

Adapters are small (rank x hidden per module) and are read whole; a base checkpoint streams a tensor at a
time.
"""

import json
import logging
import re
from pathlib import Path

import numpy as np

from lorapipe.errors import InputError
from lorapipe.formats.checkpoint_file import checkpoint_index, iter_checkpoint
from lorapipe.formats.hf_io import SafetensorsWriter, read_json, tensor_refs
from lorapipe.formats.msckpt import CheckpointWriter
from lorapipe.model.architecture import require_rope
from lorapipe.model.baichuan2 import (
    LAYER_NAME,
    LLAMA_MODULES,
    LORA_A,
    LORA_B,
    MINDSPORE_CELLS,
    PEFT_PREFIX,
    PEFT_TENSOR,
    QKV_CELLS,
    W_PACK_MODULE,
)
from lorapipe.model.lora import (
    check_adapter_shapes,
    fold,
    lora_pairs,
    lora_scale,
    read_adapter_config,
)
from lorapipe.outputs import atomic_outputs
from lorapipe.progress import Progress

log = logging.getLogger("lorapipe")


def trained_adapters(lora_ckpt, rank):
    """{(layer, cell): (A, B)} of a MindSpore LoRA checkpoint (merged_ckpt), shapes checked against its
    weights and the trained rank."""
    index = checkpoint_index(lora_ckpt)
    pairs = lora_pairs([name for name, _, _ in index], lora_ckpt)
    if not pairs:
        raise InputError(f"{lora_ckpt}: no LoRA tensors ({LORA_A}/{LORA_B}); export_peft needs the unfolded "
                         f"checkpoint (merged_ckpt), not the folded one")
    check_adapter_shapes(pairs, {name: shape for name, _, shape in index}, rank, lora_ckpt)
    names = {n for pair in pairs.values() for n in pair}
    tensors = dict(iter_checkpoint(lora_ckpt, select=names.__contains__))
    adapters = {}
    for weight, (a, b) in pairs.items():
        match = LAYER_NAME.fullmatch(weight[: -len(".weight")])
        if not match or match.group(2) not in LLAMA_MODULES:
            raise InputError(f"{lora_ckpt}: LoRA adapter {a!r}: PEFT has no module for it (adapters on "
                             f"model.layers.N.{{{', '.join(LLAMA_MODULES)}}} can be exported)")
        adapters[int(match.group(1)), match.group(2)] = (tensors[a], tensors[b])
    return adapters


def llama_layout(adapters):
    """[(PEFT module, A, B)] for the Llama layout: one module per MindSpore cell."""
    return [(f"model.layers.{layer}.{LLAMA_MODULES[cell]}", a, b) for (layer, cell), (a, b) in sorted(adapters.items())]


def w_pack_layout(adapters):
    """[(PEFT module, A, B)] for Baichuan2's layout: a layer's q, k, v adapters as one rank-3r adapter on
    W_pack (A stacked, B block diagonal; zero blocks for a projection without an adapter), the other
    modules as in the Llama layout."""
    modules = []
    for layer in sorted({layer for layer, _ in adapters}):
        qkv = [adapters.get((layer, cell)) for cell in QKV_CELLS]
        present = [p for p in qkv if p is not None]
        if present:
            (r, n_in), n_out = present[0][0].shape, present[0][1].shape[0]
            a = np.zeros((3 * r, n_in), present[0][0].dtype)
            b = np.zeros((3 * n_out, 3 * r), present[0][1].dtype)
            for k, pair in enumerate(qkv):
                if pair is not None:
                    a[k * r:(k + 1) * r] = pair[0]
                    b[k * n_out:(k + 1) * n_out, k * r:(k + 1) * r] = pair[1]
            modules.append((f"model.layers.{layer}.{W_PACK_MODULE}", a, b))
        modules += [(f"model.layers.{layer}.{LLAMA_MODULES[cell]}", *adapters[layer, cell])
                    for cell in LLAMA_MODULES if cell not in QKV_CELLS and (layer, cell) in adapters]
    return modules


def peft_config(modules, rank, alpha, dropout, base_model_name_or_path):
    """A standard PEFT LoraConfig (adapter_config.json) for [(module, A, B)] trained at `rank`, `alpha`.
    Every module keeps the scale alpha / rank: a module type adapted at another rank (W_pack: 3 * rank)
    gets the alpha that keeps it, globally when all modules share that rank, else through
    rank_pattern/alpha_pattern."""
    ranks = {}
    for module, a, _ in modules:
        kind = module.rsplit(".", 1)[1]
        if ranks.setdefault(kind, a.shape[0]) != a.shape[0]:
            raise InputError(f"{module}: LoRA rank {a.shape[0]}, other {kind} adapters have {ranks[kind]}")

    def alpha_for(r):  # alpha * r / rank, exact when r is a multiple of rank (always, here)
        return alpha * (r // rank) if r % rank == 0 else alpha * r / rank

    shared = set(ranks.values())
    top = shared.pop() if len(shared) == 1 else rank
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": top,
        "lora_alpha": _plain_number(alpha_for(top)),
        "lora_dropout": dropout,
        "target_modules": sorted(ranks),
        "rank_pattern": {k: r for k, r in sorted(ranks.items()) if r != top},
        "alpha_pattern": {k: _plain_number(alpha_for(r)) for k, r in sorted(ranks.items()) if r != top},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }


def _write_adapter(weights_path, config_path, modules, config):
    plan = []
    for module, a, b in modules:
        plan += [(f"{PEFT_PREFIX}{module}.lora_A.weight", a.dtype, a.shape),
                 (f"{PEFT_PREFIX}{module}.lora_B.weight", b.dtype, b.shape)]
    writer = SafetensorsWriter(weights_path, plan)
    try:
        for module, a, b in modules:
            writer.add(f"{PEFT_PREFIX}{module}.lora_A.weight", a)
            writer.add(f"{PEFT_PREFIX}{module}.lora_B.weight", b)
    finally:
        writer.close()
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def export_peft(lora_ckpt, adapter_config, out_dir, base_model_name_or_path, position_embedding, w_pack_dir=None,
                w_pack_base_model=None, run=None):
    """The LoRA tensors of a MindSpore checkpoint (merged_ckpt) -> a PEFT adapter folder for the Llama
    layout (adapter_model.safetensors, adapter_config.json), and with `w_pack_dir` the same adapter for
    Baichuan2's W_pack layout. Rank, alpha and dropout come from the trained run's adapter_config.json.
    `position_embedding` is the run's architecture, as the workflow decided it: RoPE only (require_rope)."""
    require_rope(position_embedding, "export_peft")
    trained = read_adapter_config(adapter_config)
    adapters = trained_adapters(lora_ckpt, trained["r"])
    layouts = [(Path(out_dir), llama_layout(adapters), base_model_name_or_path)]
    if w_pack_dir is not None:
        layouts.append((Path(w_pack_dir), w_pack_layout(adapters), w_pack_base_model or base_model_name_or_path))
    outputs = [d / f for d, _, _ in layouts for f in ("adapter_model.safetensors", "adapter_config.json")]
    with atomic_outputs(outputs, run=run, inputs=[lora_ckpt, adapter_config]) as temps:
        for k, (_, modules, base) in enumerate(layouts):
            config = peft_config(modules, trained["r"], trained["lora_alpha"], trained.get("lora_dropout", 0.0), base)
            _write_adapter(temps[2 * k], temps[2 * k + 1], modules, config)
    log.info("exported %d LoRA adapters (r %s, lora_alpha %s) to %s", len(adapters), trained["r"],
             trained["lora_alpha"], ", ".join(str(d) for d, _, _ in layouts))
    return out_dir


def _pattern_value(patterns, module, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft_adapter(adapter_dir):
    """(adapter_config, {module: (A, B, scaling)}) of a PEFT LoRA adapter folder, checked: plain LoRA on
    Linear weights only (no DoRA, biases, saved modules), each module's rank as its config says."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InputError(f"{config_path}: not a PEFT LoRA adapter config (peft_type "
                         f"{config.get('peft_type') if isinstance(config, dict) else None!r}, expected 'LORA')")
    unsupported = [(key, config.get(key)) for key, plain in (("use_dora", False), ("fan_in_fan_out", False),
                                                              ("lora_bias", False), ("bias", "none"),
                                                              ("modules_to_save", None))
                   if config.get(key, plain) not in (plain, None, [])]
    if unsupported:
        raise InputError(f"{config_path}: {unsupported[0][0]}: {unsupported[0][1]!r} is not plain LoRA; lorapipe "
                         f"imports LoRA A/B weights only")
    files = [adapter_dir / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (adapter_dir / f).is_file()]
    if not files:
        raise InputError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")
    found = {}
    for ref in tensor_refs(files[0]):
        match = PEFT_TENSOR.fullmatch(ref.name)
        if not match:
            raise InputError(f"{files[0]}: tensor {ref.name!r} is not a LoRA weight "
                             f"({PEFT_PREFIX}<module>.lora_A.weight or .lora_B.weight)")
        found.setdefault(match.group(1), {})[match.group(2)] = ref.read()
    modules = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise InputError(f"{files[0]}: {module} has lora_{''.join(ab)} but no lora_{'B' if 'A' in ab else 'A'}")
        r = _pattern_value(config.get("rank_pattern"), module, config.get("r"))
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha"))
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise InputError(f"{files[0]}: {module}.lora_A is {a.shape} and lora_B is {b.shape}; {config_path} "
                             f"says rank {r}")
        modules[module] = (a, b, lora_scale(alpha, r, config.get("use_rslora")))
    return config, modules


def mindspore_adapters(modules, where):
    """{MindSpore cell: (A, B, scaling)} for PEFT {module: (A, B, scaling)} of the Llama or W_pack layout."""
    cells = {}
    for module, (a, b, scaling) in modules.items():
        match = LAYER_NAME.fullmatch(module)
        kind = match and match.group(2)
        if kind == W_PACK_MODULE:
            for cell, (a_part, b_part) in zip(QKV_CELLS, _split_w_pack(a, b, f"{where}: {module}")):
                if a_part is not None:
                    cells[f"model.layers.{match.group(1)}.{cell}"] = (a_part, b_part, scaling)
        elif kind in MINDSPORE_CELLS:
            cells[f"model.layers.{match.group(1)}.{MINDSPORE_CELLS[kind]}"] = (a, b, scaling)
        else:
            raise InputError(f"{where}: LoRA on {module!r}: lorapipe's model has no such cell (adapters on "
                             f"{', '.join(m.rsplit('.', 1)[1] for m in MINDSPORE_CELLS)} or W_pack of "
                             f"model.layers.N can be imported)")
    return cells


def _split_w_pack(a, b, where):
    """[(A, B)] for wq, wk, wv of a W_pack adapter: block-diagonal B (as export_peft writes it) gives each
    projection its own rank-R/3 block (None for an all-zero block); any other B gives each all of A and
    its row block of B."""
    rank, rows = a.shape[0], b.shape[0]
    if rows % 3:
        raise InputError(f"{where}: lora_B has {rows} rows; W_pack's are three equal blocks")
    h = rows // 3
    blocks = [b[k * h:(k + 1) * h] for k in range(3)]
    if rank % 3 == 0:
        r = rank // 3
        own = [blk[:, k * r:(k + 1) * r] for k, blk in enumerate(blocks)]
        if all(not np.any(np.delete(blk, np.s_[k * r:(k + 1) * r], axis=1)) for k, blk in enumerate(blocks)):
            parts = [(a[k * r:(k + 1) * r], own[k]) for k in range(3)]
            return [(pa, pb) if np.any(pa) or np.any(pb) else (None, None) for pa, pb in parts]
    return [(a, blk) for blk in blocks]


def import_peft(adapter_dir, base_ckpt, dst_ckpt, dst_adapter_config=None, fold_in=False, run=None):
    """A PEFT LoRA adapter (Llama or W_pack layout) on a base MindSpore checkpoint (the `ckpt` step's) ->
    either (default) a MindSpore LoRA checkpoint, the base weights with `<cell>.mindpet_delta_lora_a/b`
    beside them, plus its adapter_config.json at `dst_adapter_config` (fold_lora, predict and evaluate
    take the pair, like merged_ckpt and the finetune's adapter_config.json), or (`fold_in`) the base
    checkpoint with the adapter folded in, which the plain model loads and export_hf turns into W_pack."""
    peft, modules = read_peft_adapter(adapter_dir)
    adapters = mindspore_adapters(modules, Path(adapter_dir) / "adapter_model")
    index = checkpoint_index(base_ckpt)
    shapes = {name: shape for name, _, shape in index}
    if lora_pairs(shapes, base_ckpt):
        raise InputError(f"{base_ckpt}: already holds LoRA tensors; import onto the base checkpoint (ckpt step)")
    for cell, (a, b, _) in adapters.items():
        weight = shapes.get(f"{cell}.weight")
        if weight is None:
            raise InputError(f"{base_ckpt}: no weight {cell}.weight for the adapter's {cell}")
        if tuple(weight) != (b.shape[0], a.shape[1]):
            raise InputError(f"{adapter_dir}: the adapter for {cell} is A {a.shape}, B {b.shape}; {base_ckpt} "
                             f"has {cell}.weight {tuple(weight)} (a different base model?)")
    outputs = [dst_ckpt] if fold_in else [dst_ckpt, dst_adapter_config]
    if not fold_in:
        if dst_adapter_config is None:
            raise InputError("importing as LoRA tensors needs an adapter config path (or fold the adapter in)")
        r, scaling = _uniform(adapters, adapter_dir)
        ours = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_ckpt),
                "r": r, "lora_alpha": _plain_number(scaling * r), "lora_dropout": peft.get("lora_dropout", 0.0),
                "target_modules": _mindformers_targets(adapters),
                "scaling": scaling, "mindspore_parameter_suffixes": [LORA_A, LORA_B], "imported_from": str(adapter_dir)}
    progress = Progress("import peft", len(index), unit="tensors")
    with atomic_outputs(outputs, run=run, inputs=[Path(adapter_dir), base_ckpt]) as temps:
        with CheckpointWriter(temps[0]) as writer:
            for i, (name, array) in enumerate(iter_checkpoint(base_ckpt)):
                cell = name[: -len(".weight")]
                if fold_in and cell in adapters:
                    a, b, scaling = adapters[cell]
                    array = fold(array, a, b, scaling, name)
                writer.add(name, array)
                if not fold_in and cell in adapters:
                    writer.add(f"{cell}.{LORA_A}", adapters[cell][0])
                    writer.add(f"{cell}.{LORA_B}", adapters[cell][1])
                progress.update(i + 1)
        if not fold_in:
            temps[1].write_text(json.dumps(ours, indent=2) + "\n", encoding="utf-8")
    log.info("imported %d LoRA adapters from %s (%s)", len(adapters), adapter_dir,
             "folded in" if fold_in else f"LoRA tensors, r {ours['r']}, scale {ours['scaling']}")
    return dst_ckpt


def _uniform(adapters, where):
    """The one (rank, scale) of all adapters: a LoRA checkpoint's adapter_config.json holds one."""
    kinds = {(a.shape[0], scaling) for a, _, scaling in adapters.values()}
    if len(kinds) > 1:
        raise InputError(f"{where}: its modules have different ranks or scales {sorted(kinds)}; a MindSpore LoRA "
                         f"checkpoint has one rank and alpha for all. Fold it in instead (--fold)")
    return kinds.pop()


def _mindformers_targets(cells):
    """pet_config.target_modules for the adapted cells, in the model's order: `.*wq|.*wk|.*wv`."""
    kinds = sorted({LAYER_NAME.fullmatch(cell).group(2) for cell in cells}, key=list(LLAMA_MODULES).index)
    return "|".join(f".*{kind.rsplit('.', 1)[1]}" for kind in kinds)


def _plain_number(x):
    return int(x) if float(x).is_integer() else x
