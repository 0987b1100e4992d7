"""The finetuned (or the base) model as an HF directory of a plain `LlamaForCausalLM`.

transformers, vLLM and llama.cpp's convert_hf_to_gguf.py load it without remote code.

A complete MindSpore checkpoint (LoRA folded, or the base) -> model.safetensors, config.json,
generation_config.json, tokenizer.model, tokenizer_config.json. W_pack's row blocks become
q_proj/k_proj/v_proj, and the NormHead is applied once (lm_head rows L2-normalised). NormHead renormalises
frozen weights at every forward, so normalising them once gives the same logits: exact for inference (not
for training lm_head further).

Streams like lorapipe.weights.convert: one model tensor (or one layer's q, k, v) in memory at a time.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from lorapipe.formats.checkpoint_file import checkpoint_index, iter_checkpoint
from lorapipe.formats.hf_io import SafetensorsWriter, read_json
from lorapipe.formats.msckpt import numpy_dtype
from lorapipe.model.architecture import require_rope
from lorapipe.model.baichuan2 import (
    EMBEDDING,
    LLAMA_MODULES,
    QKV_CELLS,
    ROPE_THETA,
    W_PACK,
    check_tensors,
    fused_record,
    mindspore_to_hf,
    norm_head,
)
from lorapipe.model.chat_template import CHAT_TEMPLATE
from lorapipe.outputs import atomic_outputs
from lorapipe.progress import Progress

log = logging.getLogger("lorapipe")


def hf_llama_config(config, dtype):
    """config.json of the plain HF Llama that computes what a Baichuan2-7B config.json describes."""
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


def export_llama(ckpt, base_dir, out_dir, position_embedding, run=None):
    """A complete (LoRA-folded, or base) MindSpore Baichuan2-7B checkpoint -> an HF Llama directory:
    model.safetensors, config.json, generation_config.json, tokenizer.model, tokenizer_config.json.
    `position_embedding` is the run's architecture, as the workflow decided it: RoPE only (require_rope)."""
    require_rope(position_embedding, "export_llama")
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    config = read_json(base_dir / "config.json")
    records = [(name, (numpy_dtype(t), shape)) for name, t, shape in checkpoint_index(ckpt)]
    # The checks of export_hf, on the Baichuan2 layout: every tensor, the right shapes, no LoRA left.
    check_tensors({n: (s, ckpt) for n, (_, s) in mindspore_to_hf(records, fused_record, ckpt)}, config, ckpt)
    plan = [(name, dtype, shape) for name, (dtype, shape) in llama_tensors(records, ckpt)]
    side = {"config.json": hf_llama_config(config, dict(records)[EMBEDDING][0]),
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
                writer.add(name, norm_head(array) if name == "lm_head.weight" else array)
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
