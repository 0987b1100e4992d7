"""The Baichuan2 model as MindFormers sees it, without importing MindFormers (cheap to import)."""

MODEL_CLASS = "Baichuan2ForCausalLM"  # registered by lorapipe.model

# The chat template's turn markers (looked up by piece in the tokenizer; 195/196 in Baichuan2's).
USER_PIECE = "<reserved_106>"
ASSISTANT_PIECE = "<reserved_107>"

# MindFormers' LoRA (mindpet) parameters of an adapted cell `<cell>`: `<cell>.mindpet_delta_lora_a`
# [rank, in] and `<cell>.mindpet_delta_lora_b` [out, rank], next to `<cell>.weight`.
LORA_A = "mindpet_delta_lora_a"
LORA_B = "mindpet_delta_lora_b"


def llama_config(hf_config, seq_length, compute_dtype="float32", param_init_type="float32", **overrides):
    """A MindFormers LlamaConfig (as a dict) for a Baichuan2 HF config.json, CPU-safe unless
    `overrides` say otherwise."""
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
        theta=10000.0,
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
    config.update(overrides)
    return config
