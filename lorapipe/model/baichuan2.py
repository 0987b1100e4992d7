"""Baichuan2's tensor names and shapes: the HF <-> MindSpore map, the exports' names, the NormHead.

Baichuan2's checkpoint layout: the HF <-> MindSpore name map and the shapes a config.json implies,
and the names of the formats it is exported to (plain Llama, PEFT).

The one place that knows the names (torchtune's convert_weights.py). No file I/O here: lorapipe.formats.hf_io
reads and writes HF files, lorapipe.weights.convert runs the two conversions.

HF -> MindSpore (W_pack split into three row blocks [0:H], [H:2H], [2H:3H]):
    model.embed_tokens.weight                   -> model.tok_embeddings.embedding_weight
    model.layers.{i}.self_attn.W_pack.weight    -> model.layers.{i}.attention.wq|wk|wv.weight
    model.layers.{i}.self_attn.o_proj.weight    -> model.layers.{i}.attention.wo.weight
    model.layers.{i}.mlp.gate|down|up_proj      -> model.layers.{i}.feed_forward.w1|w2|w3.weight
    model.layers.{i}.input_layernorm.weight     -> model.layers.{i}.attention_norm.weight
    model.layers.{i}.post_attention_layernorm   -> model.layers.{i}.ffn_norm.weight
    model.norm.weight                           -> model.norm_out.weight
    lm_head.weight                              -> lm_head.weight
"""

import re

import numpy as np

from lorapipe.errors import InputError

_TOP_LEVEL = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}
_PER_LAYER = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
W_PACK = "self_attn.W_pack.weight"
QKV = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")  # (layer, the rest): in either naming

# MindFormers' LoRA (mindpet) parameters of an adapted cell `<cell>`: `<cell>.mindpet_delta_lora_a`
# [rank, in] and `<cell>.mindpet_delta_lora_b` [out, rank], next to `<cell>.weight`.
LORA_A = "mindpet_delta_lora_a"
LORA_B = "mindpet_delta_lora_b"

# The MindSpore names read one by one outside the name maps (the host decoder, the exports).
EMBEDDING, FINAL_NORM, LM_HEAD = (_TOP_LEVEL[n] for n in ("model.embed_tokens.weight", "model.norm.weight",
                                                         "lm_head.weight"))
# A decoder layer's MindSpore parameters by their role in the forward (lorapipe.model.decode).
LAYER_PARAMETERS = {"wq": QKV[0], "wk": QKV[1], "wv": QKV[2], **{
    role: _PER_LAYER[hf] for role, hf in (("wo", "self_attn.o_proj.weight"), ("w1", "mlp.gate_proj.weight"),
                                          ("w2", "mlp.down_proj.weight"), ("w3", "mlp.up_proj.weight"),
                                          ("attention_norm", "input_layernorm.weight"),
                                          ("ffn_norm", "post_attention_layernorm.weight"))}}


def layer_weights(weights, layer):
    """{role: array} of decoder layer `layer`'s parameters in `weights` {MindSpore name: array}."""
    return {role: weights[f"model.layers.{layer}.{name}"] for role, name in LAYER_PARAMETERS.items()}


def norm_head(weight):
    """Baichuan2's NormHead applied once: lm_head's rows divided by their L2 norm, computed in float32 as
    MindSpore's L2Normalize computes it (epsilon 1e-12 on the sum of squares), in `weight`'s dtype. The
    network renormalises the frozen rows at every forward, so normalising them once gives the same logits:
    exact for inference (not for training lm_head further)."""
    w = weight.astype(np.float32)
    w /= np.sqrt(np.maximum((w * w).sum(-1, keepdims=True), np.float32(1e-12)))
    return w.astype(weight.dtype)


# Baichuan2-7B's RoPE base: fixed in its modeling code (the MindFormers YAML's theta, Llama's rope_theta).
ROPE_THETA = 10000.0

# Llama, as plain HF LlamaForCausalLM and PEFT name it (lorapipe.exports.llama and peft).
# A cell of a decoder layer in MindFormers' Llama -> the module PEFT adapts, named as in HF Llama.
# Baichuan2 names them the same, except that q, k, v are one module, self_attn.W_pack.
LLAMA_MODULES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
MINDSPORE_CELLS = {module: cell for cell, module in LLAMA_MODULES.items()}
QKV_CELLS = tuple(name[: -len(".weight")] for name in QKV)  # W_pack's row blocks, in order
W_PACK_MODULE = W_PACK[: -len(".weight")]  # self_attn.W_pack
# PEFT's saved names: the wrapped model's module path under base_model.model., adapter name removed.
PEFT_PREFIX = "base_model.model."
PEFT_TENSOR = re.compile(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight")


def hf_shapes(config):
    """{HF tensor name: shape} that a Baichuan2 config.json implies."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + W_PACK: (3 * h, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "mlp.up_proj.weight": (i, h), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def network_shapes(model_config):
    """{MindSpore parameter name: shape} of the Baichuan2 network a MindFormers model_config (a rendered
    YAML's, lorapipe.model.architecture.mindformers_model_config) describes: what a complete checkpoint for it holds."""
    h, i, v = model_config["hidden_size"], model_config["intermediate_size"], model_config["vocab_size"]
    shapes = {"model.tok_embeddings.embedding_weight": (v, h), "model.norm_out.weight": (h,),
              "lm_head.weight": (v, h)}
    for layer in range(model_config["num_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + name: (h, h) for name in (*QKV, "attention.wo.weight")})
        shapes.update({p + "feed_forward.w1.weight": (i, h), p + "feed_forward.w2.weight": (h, i),
                       p + "feed_forward.w3.weight": (i, h), p + "attention_norm.weight": (h,),
                       p + "ffn_norm.weight": (h,)})
    return shapes


def fused_record(parts):
    """The W_pack (dtype, shape) record of q, k, v (dtype, shape) records: mindspore_to_hf's `fuse` for a
    plan made from a checkpoint's index."""
    return parts[0][0], (sum(p[1][0] for p in parts), *parts[0][1][1:])


def hf_to_mindspore(name, array):
    """[(MindSpore name, array)] for one HF tensor; W_pack becomes wq, wk, wv (row blocks, views)."""
    if name in _TOP_LEVEL:
        return [(_TOP_LEVEL[name], array)]
    layer, rest = LAYER_NAME.fullmatch(name).groups()
    prefix = f"model.layers.{layer}."
    if rest == W_PACK:
        h = array.shape[0] // 3
        return [(prefix + q, array[k * h:(k + 1) * h]) for k, q in enumerate(QKV)]
    return [(prefix + _PER_LAYER[rest], array)]



def check_tensors(shapes, config, where):
    """`shapes` ({HF name: (shape, path)}) holds every tensor config.json implies, with its shape, and
    nothing else."""
    expected = hf_shapes(config)
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise InputError(f"{where}: missing tensor {missing[0]!r}" + (
            f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in shapes if n not in expected]
    if extra:
        raise InputError(f"{where}: unexpected tensor {extra[0]!r} in {shapes[extra[0]][1]}; "
                         f"config.json implies {len(expected)} tensors")
    for name, shape in expected.items():
        if tuple(shapes[name][0]) != shape:
            raise InputError(f"{shapes[name][1]}: tensor {name!r} has shape {tuple(shapes[name][0])}, "
                             f"config.json implies {shape}")


_TOP_LEVEL_HF = {ms: hf for hf, ms in _TOP_LEVEL.items()}
_PER_LAYER_HF = {ms: hf for hf, ms in _PER_LAYER.items()}


def mindspore_to_hf(pairs, fuse, where="checkpoint"):
    """Yield (HF name, x) for (MindSpore name, x) pairs; wq, wk, wv of a layer are fused into W_pack
    by `fuse([q, k, v])` once all three have been seen. Works on arrays or on shape records alike."""
    pending = {}
    for name, x in pairs:
        if name in _TOP_LEVEL_HF:
            yield _TOP_LEVEL_HF[name], x
            continue
        match = LAYER_NAME.fullmatch(name)
        rest = match and match.group(2)
        if rest in QKV:
            parts = pending.setdefault(match.group(1), {})
            parts[rest] = x
            if len(parts) == 3:
                del pending[match.group(1)]
                yield f"model.layers.{match.group(1)}.{W_PACK}", fuse([parts[q] for q in QKV])
        elif rest in _PER_LAYER_HF:
            yield f"model.layers.{match.group(1)}.{_PER_LAYER_HF[rest]}", x
        else:
            raise InputError(f"{where}: tensor {name!r} is not a Baichuan2 model weight (LoRA weights must "
                             f"be folded first; optimizer state filtered out)")
    for layer, parts in pending.items():
        missing = sorted(set(QKV) - set(parts))
        raise InputError(f"{where}: layer {layer} has no {', '.join(missing)} to fuse into W_pack")
