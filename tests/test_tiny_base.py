import json

import pytest
import sentencepiece as spm
import torch
from conftest import SAMPLE_DATA
from conftest import TINY_DIMS as DIMS

from lorapipe.weights.tiny_base import FILES, build_tiny_base


@pytest.fixture
def tiny(tiny_base_dir):
    return tiny_base_dir


def test_files_and_hf_key_names(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == sorted(FILES)
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "baichuan" and cfg["architectures"] == ["BaichuanForCausalLM"]
    h, i, v = 32, 88, cfg["vocab_size"]
    state = torch.load(tiny / "pytorch_model.bin", mmap=True, weights_only=True)
    expected = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        expected.update({
            p + "self_attn.W_pack.weight": (3 * h, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "mlp.up_proj.weight": (i, h), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    assert {k: tuple(t.shape) for k, t in state.items()} == expected
    assert all(t.dtype == torch.float32 for t in state.values())


def test_tokenizer_has_baichuan2_special_pieces(tiny):
    sp = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model"))
    assert sp.get_piece_size() == json.loads((tiny / "config.json").read_text())["vocab_size"] == 600
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.id_to_piece(2) == "</s>"
    ids = sp.encode("<reserved_106>你好<reserved_107>Hello")
    assert ids[0] == sp.piece_to_id("<reserved_106>") and sp.piece_to_id("<reserved_107>") in ids
    assert sp.decode(ids) == "<reserved_106>你好<reserved_107>Hello"


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = build_tiny_base(SAMPLE_DATA, tmp_path / "again", **DIMS)
    for name in FILES:
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    other = build_tiny_base(SAMPLE_DATA, tmp_path / "other", **dict(DIMS, seed=1))
    assert (other / "pytorch_model.bin").read_bytes() != (tiny / "pytorch_model.bin").read_bytes()
    assert (other / "tokenizer.model").read_bytes() == (tiny / "tokenizer.model").read_bytes()


def test_failure_leaves_no_partial_output(tmp_path):
    with pytest.raises(ValueError, match="hidden_size 30 is not a multiple of num_heads 4"):
        build_tiny_base(SAMPLE_DATA, tmp_path / "base", **dict(DIMS, hidden_size=30))
    # issue 35: a head dimension RoPE cannot rotate (66 / 2 = 33) once reached the ranks; ALiBi takes it
    with pytest.raises(ValueError, match="tiny_base.hidden_size and num_attention_heads: hidden_size 66 / num_heads "
                                         "2 is a head dimension of 33, which RoPE cannot rotate"):
        build_tiny_base(SAMPLE_DATA, tmp_path / "base", **dict(DIMS, hidden_size=66, num_attention_heads=2))
    assert not (tmp_path / "base").exists()
    with pytest.raises(ValueError, match="tiny_base.vocab_size 300 cannot be trained on this data: "
                                         "Vocabulary size is smaller than required_chars"):
        build_tiny_base(SAMPLE_DATA, tmp_path / "base", **dict(DIMS, vocab_size=300))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError):
        build_tiny_base(bad, tmp_path / "base", **DIMS)
    assert not (tmp_path / "base").exists() or not any((tmp_path / "base").iterdir())
