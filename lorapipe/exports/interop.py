"""The finetuned model and its LoRA adapter in the formats other tools load, and adapters back in.

* export_llama: a complete MindSpore checkpoint (LoRA folded, or the base) -> an HF directory of a plain
  `LlamaForCausalLM`. W_pack's row blocks become q_proj/k_proj/v_proj, and the NormHead is applied once
  (lm_head rows L2-normalised). NormHead renormalises frozen weights at every forward, so normalising them
  once gives the same logits: exact for inference (not for training lm_head further). transformers, vLLM
  and llama.cpp's convert_hf_to_gguf.py load it without remote code.
* export_peft: the trained LoRA tensors (merged_ckpt, unfolded) -> a standard PEFT adapter for that
  Llama layout, and the same adapter for Baichuan2's own W_pack layout.
* import_peft: a PEFT LoRA adapter for either layout -> a MindSpore LoRA checkpoint with its
  adapter_config.json (what fold_lora, predict and evaluate take), or the base checkpoint with it folded.

LoRA is the same in MindFormers (mindpet) and PEFT: A [r, in], B [out, r], W' = W + (B @ A) * alpha / r.

The W_pack layout. W_pack = [Wq; Wk; Wv] by rows, so LoRA of rank r on each of q, k, v is exactly one
LoRA of rank 3r on W_pack with A = [Aq; Ak; Av] (stacked rows) and B = blockdiag(Bq, Bk, Bv), since
B @ A = [Bq Aq; Bk Ak; Bv Av]; writing lora_alpha 3 * alpha keeps the scale alpha / r. Going back, any
W_pack adapter of rank R is rank R on each of wq, wk, wv (all of A, B's row block); a block-diagonal one
(as written here) comes back at rank R / 3 with the original tensors.

Streams like lorapipe.weights.convert: one model tensor (or one layer's q, k, v) in memory at a time. Adapters
are small (rank x hidden per module) and are read whole.
"""

import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np

from lorapipe.model.baichuan2 import (
    LAYER_NAME,
    LLAMA_MODULES,
    MINDSPORE_CELLS,
    PEFT_PREFIX,
    PEFT_TENSOR,
    QKV_CELLS,
    ROPE_THETA,
    W_PACK,
    W_PACK_MODULE,
    check_tensors,
    fused_record,
    mindspore_to_hf,
)
from lorapipe.model.chat_template import CHAT_TEMPLATE
from lorapipe.errors import InputError
from lorapipe.formats.hf_io import SafetensorsWriter, read_json, tensor_refs
from lorapipe.model.lora import check_adapter_shapes, fold, lora_pairs, read_adapter_config
from lorapipe.formats.msckpt import CheckpointWriter, checkpoint_index, iter_checkpoint, numpy_dtype
from lorapipe.outputs import atomic_outputs
from lorapipe.progress import Progress
from lorapipe.model.architecture import ALIBI, LORA_A, LORA_B, position_embedding

log = logging.getLogger("lorapipe")



# -- the Llama directory ----------------------------------------------------------------------------

LLAMA_NEEDS_ROPE = "a Llama-format export needs rotary position embeddings and would compute something else"


def check_rope(config, where, override="auto", reason=LLAMA_NEEDS_ROPE):
    """Refuse an ALiBi model (Baichuan2-13B) for an export whose format has rotary position embeddings
    only (`reason` says which). The architecture is lorapipe.model.architecture.position_embedding's, of config.json and
    `override` (base_model.position_embedding; the workflow passes the one it planned with, so that a job
    never decides otherwise)."""
    if position_embedding(config, override, where) != ALIBI:
        return
    explicit = config.get("position_embedding")
    why = f'"position_embedding": "{explicit}"' if explicit else \
        'hidden_size 5120 (Baichuan2-13B) and no "position_embedding": "ROPE"'
    raise InputError(f"{where}: an ALiBi model ({why}); {reason}. The Baichuan2 layout (export_hf) keeps ALiBi")


def llama_config(config, dtype, where="config.json", override="auto"):
    """config.json of the plain HF Llama that computes what a Baichuan2-7B config.json describes."""
    check_rope(config, where, override)
    h, heads = config["hidden_size"], config["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config["vocab_size"],
        "hidden_size": h,
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": h // heads,
        "hidden_act": config.get("hidden_act", "silu"),
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
        "rms_norm_eps": config["rms_norm_eps"],
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "initializer_range": config.get("initializer_range", 0.02),
        "bos_token_id": config.get("bos_token_id", 1),
        "eos_token_id": config.get("eos_token_id", 2),
        "pad_token_id": config.get("pad_token_id", 0),
        "use_cache": True,
        "torch_dtype": np.dtype(dtype).name,
    }


def tokenizer_config(tokenizer_model, config):
    """tokenizer_config.json of a plain LlamaTokenizer over Baichuan2's sentencepiece model that gives
    lorapipe's ids (chat_ids), fast or slow:
    - no BOS/EOS added, as in training;
    - split_special_tokens: a literal `</s>` in text is text, never the control id (docs/architecture.md,
      "Control tokens and role markers are text");
    - the turn markers are plain added tokens, so they are ids even with split_special_tokens and even
      where the sentencepiece model has them as control pieces;
    - add_prefix_space as the model's own add_dummy_prefix (Baichuan2's: off), so the fast tokenizer
      converted from it matches."""
    from lorapipe.model.tokenizer import ChatTokenizer

    tok = ChatTokenizer(tokenizer_model)  # checks that the turn markers are there
    sp = tok.sp

    def piece(i):
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    added = {str(i): {"content": piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": False} for i in (tok.user, tok.assistant)}
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(tok.eos),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(config.get("pad_token_id", 0)),
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": True,
        "add_prefix_space": sp.encode("a", out_type=str)[0].startswith("\u2581"),
        "split_special_tokens": True,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.get("model_max_length", config.get("max_position_embeddings", 4096)),
        "chat_template": CHAT_TEMPLATE,
    }


def llama_tensors(pairs, where="checkpoint"):
    """(Llama name, x) for MindSpore (name, x) pairs: Baichuan2's HF names, with each layer's q, k, v
    as q_proj, k_proj, v_proj instead of W_pack. Works on arrays or on (dtype, shape) records."""
    for name, x in mindspore_to_hf(pairs, tuple, where):
        if name.endswith(W_PACK):
            prefix = name[: -len(W_PACK)]
            for cell, part in zip(QKV_CELLS, x):
                yield f"{prefix}{LLAMA_MODULES[cell]}.weight", part
        else:
            yield name, x


def normalize_rows(weight):
    """NormHead applied once: rows of lm_head / their L2 norm, computed in fp32 (as the model does)."""
    w = weight.astype(np.float32)
    w /= np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), np.float32(1e-12))
    return w.astype(weight.dtype)


def export_llama(ckpt, base_dir, out_dir, position_embedding="auto", run=None):
    """A complete (LoRA-folded, or base) MindSpore Baichuan2-7B checkpoint -> an HF Llama directory:
    model.safetensors, config.json, generation_config.json, tokenizer.model, tokenizer_config.json.
    `position_embedding` is base_model.position_embedding (see check_rope)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config = read_json(base_dir / "config.json")
    check_rope(config, base_dir / "config.json", position_embedding)
    records = [(name, (numpy_dtype(t), shape)) for name, t, shape in checkpoint_index(ckpt)]
    # The checks of export_hf, on the Baichuan2 layout: every tensor, the right shapes, no LoRA left.
    check_tensors({n: (s, ckpt) for n, (_, s) in mindspore_to_hf(records, fused_record, ckpt)}, config, ckpt)
    plan = [(name, dtype, shape) for name, (dtype, shape) in llama_tensors(records, ckpt)]
    side = {"config.json": llama_config(config, dict(records)["model.tok_embeddings.embedding_weight"][0],
                                        base_dir / "config.json", position_embedding),
            "generation_config.json": _generation_config(base_dir, config),
            "tokenizer_config.json": tokenizer_config(base_dir / "tokenizer.model", config)}
    inputs = [ckpt, base_dir / "config.json", base_dir / "tokenizer.model"]
    inputs += [base_dir / "generation_config.json"] if (base_dir / "generation_config.json").is_file() else []
    outputs = [out_dir / "model.safetensors", out_dir / "tokenizer.model", *(out_dir / f for f in side)]
    progress = Progress("export llama", len(plan), unit="tensors")
    with atomic_outputs(outputs, run=run, inputs=inputs, hashed_inline=[ckpt],
                        need_bytes=Path(ckpt).stat().st_size) as temps:
        writer = SafetensorsWriter(temps[0], plan)
        try:
            for i, (name, array) in enumerate(llama_tensors(iter_checkpoint(ckpt, hashed=True), ckpt)):
                writer.add(name, normalize_rows(array) if name == "lm_head.weight" else array)
                progress.update(i + 1)
        finally:
            writer.close()
        shutil.copyfile(base_dir / "tokenizer.model", temps[1])
        for temp, content in zip(temps[2:], side.values()):
            temp.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def _generation_config(base_dir, config):
    """The base model's generation_config.json (its recommended decoding), with the special token ids."""
    path = base_dir / "generation_config.json"
    generation = read_json(path) if path.is_file() else {}
    for key, default in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        generation.setdefault(key, config.get(key, default))
    return generation


# -- PEFT adapters out -------------------------------------------------------------------------------

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


def export_peft(lora_ckpt, adapter_config, out_dir, base_model_name_or_path, w_pack_dir=None,
                w_pack_base_model=None, run=None):
    """The LoRA tensors of a MindSpore checkpoint (merged_ckpt) -> a PEFT adapter folder for the Llama
    layout (adapter_model.safetensors, adapter_config.json), and with `w_pack_dir` the same adapter for
    Baichuan2's W_pack layout. Rank, alpha and dropout come from the trained run's adapter_config.json."""
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


# -- PEFT adapters in --------------------------------------------------------------------------------

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
        modules[module] = (a, b, alpha / (math.sqrt(r) if config.get("use_rslora") else r))
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
