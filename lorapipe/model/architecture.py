"""The Baichuan2 model as MindFormers sees it, without importing MindFormers (cheap to import)."""

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

# The chat template's turn markers (looked up by piece in the tokenizer; 195/196 in Baichuan2's).
USER_PIECE = "<reserved_106>"
ASSISTANT_PIECE = "<reserved_107>"

# MindFormers' LoRA (mindpet) parameters of an adapted cell `<cell>`: `<cell>.mindpet_delta_lora_a`
# [rank, in] and `<cell>.mindpet_delta_lora_b` [out, rank], next to `<cell>.weight`.
LORA_A = "mindpet_delta_lora_a"
LORA_B = "mindpet_delta_lora_b"


def position_embedding(hf_config, override="auto", where="config.json"):
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


def model_arch(hf_config, override="auto", where="config.json"):
    """(position embedding, the registered model class) of a base model's config.json and the config's
    base_model.position_embedding: what a rendered YAML's model_config and model.arch.type say."""
    kind = position_embedding(hf_config, override, where)
    return kind, ALIBI_MODEL_CLASS if kind == ALIBI else MODEL_CLASS


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


def llama_config(hf_config, seq_length, compute_dtype="float32", param_init_type="float32",
                 position_embedding_type=ROPE, **overrides):
    """A MindFormers LlamaConfig (as a dict) for a Baichuan2 HF config.json, CPU-safe unless
    `overrides` say otherwise. `position_embedding_type` "alibi" (lorapipe.model.architecture.position_embedding)
    marks the Baichuan2-13B network; RoPE configs do not carry the key."""
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
