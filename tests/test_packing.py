"""Packed rows (data.packing): several conversations in one row, kept apart by segment ids. The network's
block-diagonal causal mask (lorapipe.model.SegmentCausalMask) must give every conversation the logits and
per-token loss it has alone, for RoPE (Baichuan2-7B) and for ALiBi (Baichuan2-13B), and a conversation
must never see another's tokens."""

import json

import numpy as np
import pytest

from conftest import SAMPLE_DATA
from lorapipe.spec import llama_config
from lorapipe.spec import position_embedding as from_hf_config

SEQ = 64
LENGTHS = (13, 21, 9)  # three conversations, then padding


def models(base_dir, tmp_path):
    """(plain network, packed network) of one base model, the same weights."""
    from lorapipe.generate import load_model
    from lorapipe.weights import convert_hf_to_mindspore

    hf_config = json.loads((base_dir / "config.json").read_text())
    ckpt = convert_hf_to_mindspore(base_dir, tmp_path / "rank_0" / "base.ckpt")
    plain = llama_config(hf_config, SEQ, position_embedding_type=from_hf_config(hf_config))
    return load_model(plain, ckpt), load_model(dict(plain, packing=True), ckpt)


@pytest.fixture(scope="module", params=["rope", "alibi"])
def networks(request, tiny_base_dir, tmp_path_factory):
    from lorapipe.tiny_base import build_tiny_base

    if request.param == "rope":
        base = tiny_base_dir
    else:  # 5 heads, so that the ALiBi slopes interleave (not a power of two), as Baichuan2-13B's 40
        base = build_tiny_base(SAMPLE_DATA, tmp_path_factory.mktemp("alibi") / "base", seed=1, hidden_size=40,
                               num_hidden_layers=2, num_attention_heads=5, intermediate_size=110,
                               max_position_embeddings=256, vocab_size=600, init_std=0.02, position_embedding="alibi")
    return models(base, tmp_path_factory.mktemp(request.param))


def packed_row(conversations):
    ids, segments = np.zeros(SEQ, np.int32), np.zeros(SEQ, np.int32)
    start = 0
    for k, conversation in enumerate(conversations, 1):
        ids[start:start + len(conversation)] = conversation
        segments[start:start + len(conversation)] = k
        start += len(conversation)
    return ids, segments


def token_losses(logits, ids):
    """Cross entropy of each next token (position t predicts ids[t + 1]), in float64."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(ids) - 1), ids[1:]]


def test_each_conversation_of_a_packed_row_computes_what_it_computes_alone(networks):
    from lorapipe.model import logits

    plain, packed = networks
    rng = np.random.default_rng(0)
    conversations = [rng.integers(3, 600, n).astype(np.int32) for n in LENGTHS]
    ids, segments = packed_row(conversations)
    together = logits(packed, ids[None], segments[None])[0]
    start = 0
    for conversation in conversations:
        alone = logits(plain, conversation[None])[0]
        mine = together[start:start + len(conversation)]
        assert np.abs(mine - alone).max() < 1e-5, np.abs(mine - alone).max()
        assert np.abs(token_losses(mine, conversation) - token_losses(alone, conversation)).max() < 1e-5
        start += len(conversation)

    # Another conversation in the middle changes nothing of the others, to the bit.
    other = list(conversations)
    other[1] = rng.integers(3, 600, LENGTHS[1]).astype(np.int32)
    changed = logits(packed, packed_row(other)[0][None], segments[None])[0]
    first, third = slice(0, LENGTHS[0]), slice(LENGTHS[0] + LENGTHS[1], sum(LENGTHS))
    assert np.array_equal(changed[first], together[first]) and np.array_equal(changed[third], together[third])
    assert not np.allclose(changed[LENGTHS[0]:LENGTHS[0] + LENGTHS[1]], together[LENGTHS[0]:LENGTHS[0] + LENGTHS[1]])


def test_an_unpacked_row_is_one_segment(networks):
    """Held-out rows stay unpacked and carry no segment ids: the packed network reads them as one
    conversation, with MindFormers' own mask's result on every token that is not padding."""
    from lorapipe.model import logits

    plain, packed = networks
    ids = np.zeros(SEQ, np.int32)
    ids[:30] = np.random.default_rng(1).integers(3, 600, 30)
    assert np.abs(logits(packed, ids[None])[0, :30] - logits(plain, ids[None])[0, :30]).max() < 1e-5
