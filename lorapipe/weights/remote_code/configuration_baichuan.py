# The tiny base model's remote code (written for lorapipe, not Baichuan's): its config.json names this
# class in "auto_map", as Baichuan2-7B/13B-Chat's config.json names theirs, so that an HF directory
# lorapipe writes must carry its remote code to load, as the real one must.
from transformers import PretrainedConfig


class BaichuanConfig(PretrainedConfig):
    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=125696, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, hidden_act="silu", model_max_length=4096, rms_norm_eps=1e-6,
                 initializer_range=0.02, position_embedding=None, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.hidden_act, self.model_max_length, self.rms_norm_eps = hidden_act, model_max_length, rms_norm_eps
        self.initializer_range = initializer_range
        # "ALIBI" (Baichuan2-13B) or "ROPE"; absent: ALiBi exactly when hidden_size is 5120, as the real models are
        self.position_embedding = position_embedding
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
