"""The Baichuan2 model as MindFormers sees it, without importing MindFormers: RoPE or ALiBi."""

import math

from lorapipe.errors import ConfigError, InputError
from lorapipe.model.baichuan2 import ROPE_THETA

MODEL_CLASS = "Baichuan2ForCausalLM"  # registered by lorapipe.model.network: Baichuan2-7B (RoPE)
# Baichuan2-13B (ALiBi), registered by lorapipe.model.network under the name MindFormers r1.0's recipe YAML gives it
# (research/baichuan2/run_baichuan2_13b_lora_910b.yaml, model.arch.type).
ALIBI_MODEL_CLASS = "Baichuan13BV2ForCausalLM"

# The two position encodings of Baichuan2, as base_model.position_embedding and tiny_base.position_embedding
# name them; an explicit "position_embedding" in config.json spells them "ROPE" / "ALIBI" (vLLM's names).
ROPE, ALIBI = "rope", "alibi"
# Baichuan2-13B's width: with no explicit "position_embedding" in config.json, this width means ALiBi
# (docs/architecture.md, "The architecture is decided once"); vLLM keys the same choice on 4096 (RoPE).
# Both agree on the real models.
ALIBI_HIDDEN_SIZE = 5120
# model_config key that marks an ALiBi network (the name MindFormers' TransformerConfig uses for the
# choice); absent means RoPE, so a 7B YAML is unchanged.
POSITION_EMBEDDING_KEY = "position_embedding_type"


def position_embedding_of(hf_config, override="auto", where="config.json"):
    """"rope" or "alibi": the architecture a Baichuan2 config.json describes. An explicit
    "position_embedding" ("ROPE" | "ALIBI") wins; otherwise `override` (base_model.position_embedding:
    auto | rope | alibi) decides, and "auto" means ALiBi exactly when hidden_size is 5120 (Baichuan2-13B).
    An override that contradicts an explicit value is an error: the weights were trained with that one."""
    if override not in ("auto", ROPE, ALIBI):
        raise ConfigError(f"base_model.position_embedding {override!r}: expected auto, rope or alibi")
    explicit = hf_config.get("position_embedding")
    if explicit is None:
        if override != "auto":
            return override
        return ALIBI if hf_config.get("hidden_size") == ALIBI_HIDDEN_SIZE else ROPE
    kind = str(explicit).lower()
    if kind not in (ROPE, ALIBI):
        raise InputError(f'{where}: "position_embedding": {explicit!r}: expected "ROPE" or "ALIBI"')
    if override not in ("auto", kind):
        raise ConfigError(f'base_model.position_embedding {override} contradicts {where}, which says '
                          f'"position_embedding": "{explicit}" (the weights were trained with {kind.upper()}); '
                          f"set it to auto or {kind}")
    return kind


def model_class(position_embedding):
    """The registered model class of an architecture ("rope" | "alibi", decided once by
    lorapipe.config.run_position_embedding): what a rendered YAML's model.arch.type says."""
    classes = {ROPE: MODEL_CLASS, ALIBI: ALIBI_MODEL_CLASS}
    if position_embedding not in classes:
        raise ValueError(f"position_embedding {position_embedding!r}: expected {ROPE} or {ALIBI}")
    return classes[position_embedding]


# The exports whose formats have rotary position embeddings only, and why each cannot take an ALiBi model.
_LLAMA = "a plain LlamaForCausalLM has rotary position embeddings only, so the export would compute something else"
ROPE_ONLY_EXPORTS = {
    "export_llama": _LLAMA,
    "export_llama_base": _LLAMA,
    "export_peft": "its adapters are for the Llama-format export (hf_llama_base) and for Baichuan2's W_pack layout "
                   "beside it, and " + _LLAMA,
    "export_gguf": "llama.cpp's llama architecture has rotary position embeddings only, and its baichuan "
                   "architecture picks RoPE or ALiBi from the layer count alone (32 layers RoPE, 40 ALiBi, any other "
                   "count neither), so the file could not be proven to compute what this model computes",
}


def require_rope(position_embedding, export):
    """`position_embedding` if it is RoPE; for ALiBi (Baichuan2-13B) a ConfigError saying why `export` (a key
    of ROPE_ONLY_EXPORTS) cannot be made. The one guard of the RoPE-only exports: the workflow calls it when
    it plans one, and each export job calls it again with the value it was handed."""
    model_class(position_embedding)  # rope or alibi
    if position_embedding == ALIBI:
        raise ConfigError(f"{export}: the base model uses ALiBi (Baichuan2-13B); {ROPE_ONLY_EXPORTS[export]}. The "
                          f"Baichuan2 layout (export_hf) keeps ALiBi")
    return position_embedding


def head_problem(hidden_size, num_heads, position_embedding):
    """Why a network of these widths cannot run, or None: the heads split hidden_size evenly, and under RoPE
    each head's dimension is even, since RoPE rotates a head's first half against its second (MindFormers'
    rotary embedding slices its tables to head_dim and reshapes them by halves: an odd head_dim stops every
    rank inside it)."""
    if hidden_size % num_heads:
        return f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}"
    if position_embedding == ROPE and hidden_size // num_heads % 2:
        return (f"hidden_size {hidden_size} / num_heads {num_heads} is a head dimension of "
                f"{hidden_size // num_heads}, which RoPE cannot rotate: it turns a head's dimensions in pairs, "
                f"so the head dimension must be even")
    return None


def unsupported_attention(position_embedding, packing=False, use_flash_attention=False, use_past=False):
    """Why lorapipe's network cannot run this attention setting, or None: the one home of these refusals.
    The config refuses them before planning (naming its keys), the network if a hand-written YAML asks."""
    if packing and (use_flash_attention or use_past):
        # MindFormers' packed path is flash attention's eod mask compression, which needs seq_length >= 2048
        # (modules/transformer/transformer.py:824-825, reached from models/llama/llama.py:165).
        return ("packed rows keep their conversations apart with lorapipe's own block-diagonal mask "
                "(network.SegmentCausalMask), which flash attention and incremental decoding do not read; "
                "MindFormers' own packed flash attention needs seq_length >= 2048")
    if position_embedding == ALIBI and (use_flash_attention or use_past):
        # Incremental decoding runs MindFormers' InferAttention and paged attention, whose LLaMA path is
        # RoPE-only (llama_transformer.py:317-333, 494-496).
        return ("MindFormers' flash attention takes ALiBi as a separate input that lorapipe's Baichuan2-13B network "
                "does not build, and its incremental decoding is RoPE-only; the 13B trains without flash attention, "
                "as r1.0's recipe does, and predict decodes it on the host")
    return None


def is_alibi(model_config):
    """Whether a MindFormers model_config (a rendered YAML's) describes the ALiBi network."""
    return model_config.get(POSITION_EMBEDDING_KEY, ROPE) == ALIBI


def alibi_slopes(num_heads):
    """Baichuan's per-head ALiBi slopes (`_get_interleave` in Baichuan2-13B's modeling_baichuan.py, from
    the ALiBi paper): for n a power of two, the geometric series start^1..start^n with
    start = 2^(-8/n); otherwise those of the largest power of two below n, then every other slope of
    twice that power, up to n heads. Python floats (float64)."""
    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][:num_heads - closest]


def mindformers_model_config(hf_config, seq_length, compute_dtype="float32", param_init_type="float32",
                 position_embedding_type=ROPE, **overrides):
    """A MindFormers LlamaConfig (as a dict) for a Baichuan2 HF config.json, CPU-safe unless
    `overrides` say otherwise. `position_embedding_type` "alibi" marks the Baichuan2-13B network; RoPE configs do
    not carry the key."""
    config = dict(
        type="LlamaConfig",
        batch_size=1,
        seq_length=seq_length,
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        intermediate_size=hf_config["intermediate_size"],
        vocab_size=hf_config["vocab_size"],
        rms_norm_eps=hf_config["rms_norm_eps"],
        theta=ROPE_THETA,
        bos_token_id=hf_config.get("bos_token_id", 1),
        eos_token_id=hf_config.get("eos_token_id", 2),
        pad_token_id=hf_config.get("pad_token_id", 0),
        ignore_token_id=-100,
        compute_dtype=compute_dtype,
        layernorm_compute_type="float32",
        softmax_compute_type="float32",
        rotary_dtype="float32",
        param_init_type=param_init_type,
        use_past=False,
        use_flash_attention=False,
        fused_rms_norm=False,
        use_rope_slice=True,
        tie_word_embeddings=False,
    )
    if position_embedding_type == ALIBI:
        # RoPE's settings do not apply (the network's rotary embedding is the identity).
        for rope_key in ("theta", "rotary_dtype", "use_rope_slice"):
            del config[rope_key]
        config[POSITION_EMBEDDING_KEY] = ALIBI
    elif position_embedding_type != ROPE:
        raise ValueError(f"position_embedding_type {position_embedding_type!r}: expected {ROPE} or {ALIBI}")
    config.update(overrides)
    return config
