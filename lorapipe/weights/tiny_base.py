"""The embedded tiny default base model: a small Baichuan2-shaped HF model directory.

Baichuan2-7B-shaped, or with position_embedding "alibi" Baichuan2-13B-shaped.

It stands in for the 15 GB `baichuan-inc/Baichuan2-7B-Chat` download: the same files and tensor names
(config.json, pytorch_model.bin with `model.layers.{i}.self_attn.W_pack.weight`, `lm_head.weight`, ...,
tokenizer.model), at small dimensions, generated deterministically from a seed. Baichuan2-13B has the
same files and names; a tiny ALiBi model says so in config.json ("position_embedding": "ALIBI"), since
its width is not 13B's 5120 (lorapipe.model.architecture.position_embedding). The sentencepiece
tokenizer is trained on the sample conversations with Baichuan2's special pieces: unk 0, bos 1, eos 2,
and `<reserved_106>` / `<reserved_107>` (the user and assistant markers) as single symbols.
"""

import io
import json
from pathlib import Path

import sentencepiece as spm

from lorapipe.data.conversations import conversation_texts
from lorapipe.data.sources import input_files
from lorapipe.errors import InputError
from lorapipe.model.architecture import ALIBI, ROPE, head_problem
from lorapipe.model.baichuan2 import hf_shapes
from lorapipe.model.tokenizer import ASSISTANT_PIECE, USER_PIECE
from lorapipe.outputs import atomic_outputs

# Baichuan2's remote code, as its config.json and tokenizer_config.json name it in "auto_map": the tiny
# model ships small files of lorapipe's own (remote_code/), so that what the real download needs, the
# exports must carry for the tiny model too.
REMOTE_CODE = Path(__file__).resolve().parent / "remote_code"
REMOTE_CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
FILES = ("pytorch_model.bin", "config.json", "generation_config.json", "tokenizer_config.json",
         "tokenizer.model", *REMOTE_CODE_FILES)


def hf_config(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
              max_position_embeddings, vocab_size, position_embedding=None):
    """config.json as Baichuan2-7B-Chat ships it, with the given dimensions; `position_embedding`
    ("rope" | "alibi") adds the explicit "position_embedding" key, None leaves it out (the 7B's file)."""
    config = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_max_length": max_position_embeddings,
        "model_type": "baichuan",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "tokenizer_class": "BaichuanTokenizer",
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if position_embedding is not None:
        if position_embedding not in (ROPE, ALIBI):
            raise InputError(f"tiny_base.position_embedding {position_embedding!r}: expected {ROPE} or {ALIBI}")
        config["position_embedding"] = position_embedding.upper()
    return config


def train_tokenizer(texts, vocab_size, user_defined_symbols=(USER_PIECE, ASSISTANT_PIECE)):
    """Train a Baichuan2-style BPE sentencepiece model on `texts`; returns the model bytes.

    Single-threaded and over the texts in their given order, so the bytes are reproducible.
    """
    model = io.BytesIO()
    try:
        _train_sentencepiece(texts, vocab_size, model, list(user_defined_symbols))
    except RuntimeError as e:  # sentencepiece's own message names its C++ source line, not the key
        raise InputError(f"tiny_base.vocab_size {vocab_size} cannot be trained on this data: "
                         f"{str(e).split('] ')[-1]}") from None
    return model.getvalue()


def _train_sentencepiece(texts, vocab_size, model, user_defined_symbols):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=user_defined_symbols,
        num_threads=1,
        minloglevel=2,
    )


def random_weights(config, seed, init_std):
    """Seeded HF-named Baichuan2 state dict (float32), with the names and shapes of hf_shapes. Norm
    weights are near 1 but not equal to 1, so a mapping that swapped two norms would show in a parity
    test. The draws (and the state dict) go embedding, layers, final norm, lm_head: the tiny model's
    bytes depend on that order."""
    import torch  # here: lorapipe.config reads hf_config while the workflow is parsed

    gen = torch.Generator().manual_seed(seed)
    shapes = hf_shapes(config)
    layers = [name for name in shapes if name.startswith("model.layers.")]
    state = {}
    for name in ("model.embed_tokens.weight", *layers, "model.norm.weight", "lm_head.weight"):
        shape = shapes[name]
        noise = torch.randn(*shape, generator=gen)
        state[name] = 1.0 + 0.1 * noise if len(shape) == 1 else noise * init_std
    return state


def build_tiny_base(data, out_dir, *, seed, hidden_size, num_hidden_layers, num_attention_heads,
                    intermediate_size, max_position_embeddings, vocab_size, init_std, position_embedding=None,
                    run=None):
    """Write the tiny base model directory (FILES) atomically. Same arguments, same bytes."""
    import torch
    problem = head_problem(hidden_size, num_attention_heads, ALIBI if position_embedding == ALIBI else ROPE)
    if problem:
        raise InputError(f"tiny_base.hidden_size and num_attention_heads: {problem}")
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(conversation_texts(data), vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    config = hf_config(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
                       max_position_embeddings, sp.get_piece_size(), position_embedding)
    state = random_weights(config, seed, init_std)
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "user_token_id":
                  sp.piece_to_id(USER_PIECE), "assistant_token_id": sp.piece_to_id(ASSISTANT_PIECE)}
    tokenizer_config = {"auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
                        "tokenizer_class": "BaichuanTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                        "unk_token": "<unk>", "pad_token": "<unk>", "add_bos_token": False,
                        "add_eos_token": False, "model_max_length": max_position_embeddings}

    with atomic_outputs([out_dir / f for f in FILES], run=run, inputs=input_files(data)) as tmp:
        paths = dict(zip(FILES, tmp))
        for name, obj in (("config.json", config), ("generation_config.json", generation),
                          ("tokenizer_config.json", tokenizer_config)):
            paths[name].write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        paths["tokenizer.model"].write_bytes(tokenizer)
        for name in REMOTE_CODE_FILES:
            paths[name].write_bytes((REMOTE_CODE / name).read_bytes())
        # A file object, not a path: torch names the zip's inner folder after a path, and the
        # temporary name would then leak into the bytes.
        with open(paths["pytorch_model.bin"], "wb") as f:
            torch.save(state, f)
    return out_dir
