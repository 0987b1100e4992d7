"""Packed rows (data.packing): several conversations in one row, kept apart by segment ids. The network's
block-diagonal causal mask (lorapipe.model.network.SegmentCausalMask) must give every conversation the logits and
per-token loss it has alone, for RoPE (Baichuan2-7B) and for ALiBi (Baichuan2-13B), and a conversation
must never see another's tokens."""

import json

import numpy as np
import pytest
from conftest import SAMPLE_DATA

from lorapipe.model.architecture import mindformers_model_config, position_embedding_of

SEQ = 64
LENGTHS = (13, 21, 9)  # three conversations, then padding


def models(base_dir, tmp_path):
    """(plain network, packed network) of one base model, the same weights."""
    from lorapipe.infer.loader import load_model
    from lorapipe.weights.convert import convert_hf_to_mindspore

    hf_config = json.loads((base_dir / "config.json").read_text())
    ckpt = convert_hf_to_mindspore(base_dir, tmp_path / "rank_0" / "base.ckpt")
    plain = mindformers_model_config(hf_config, SEQ, position_embedding_type=position_embedding_of(hf_config))
    return load_model(plain, ckpt), load_model(dict(plain, packing=True), ckpt)


@pytest.fixture(scope="module", params=["rope", "alibi"])
def networks(request, tiny_base_dir, tmp_path_factory):
    from lorapipe.weights.tiny_base import build_tiny_base

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
    from lorapipe.model.network import logits

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
    from lorapipe.model.network import logits

    plain, packed = networks
    ids = np.zeros(SEQ, np.int32)
    ids[:30] = np.random.default_rng(1).integers(3, 600, 30)
    assert np.abs(logits(packed, ids[None])[0, :30] - logits(plain, ids[None])[0, :30]).max() < 1e-5


# -- the data: packed rows ------------------------------------------------------------------------------

def read_columns(path):
    import mindspore.dataset as ds

    rows = list(ds.MindDataset(str(path), shuffle=False).create_dict_iterator(output_numpy=True))
    return {column: np.stack([row[column] for row in rows]) for column in rows[0]}


@pytest.mark.parametrize("seq_length", [8, 24, 64, 512])  # most conversations truncated .. many per row
def test_packed_rows_are_the_unpacked_rows_packed_in_order(tmp_path, tiny_base_dir, seq_length):
    """Differential, over 3,000 random BELLE records (empty ones, long ones, every role order): the packed
    MindRecord's rows, cut at their segment ids, are the unpacked MindRecord's rows in their order, each
    whole (a truncated one fills a row), its first label ignored, and nothing else in the row but padding.
    Each packed row is full in the next-fit sense: the next row's first conversation did not fit in it.
    The held-out MindRecord is the unpacked one, byte for byte."""
    import random

    from test_data import random_belle

    from lorapipe.data.pipeline import preprocess_conversations

    records = random_belle(random.Random(seq_length), 3000, system=True)
    (tmp_path / "r.json").write_text(json.dumps(records, ensure_ascii=False))
    width = seq_length + 1
    outputs = {}
    for packing in (False, True):
        out = tmp_path / str(packing)
        stats = preprocess_conversations(tmp_path / "r.json", tiny_base_dir / "tokenizer.model", out / "t.mindrecord",
                                         seq_length, heldout_file=out / "h.mindrecord", heldout_fraction=0.1,
                                         packing=packing)
        outputs[packing] = stats, read_columns(out / "t.mindrecord")
    (_, plain), (stats, packed) = outputs[False], outputs[True]
    assert (tmp_path / "True/h.mindrecord").read_bytes() == (tmp_path / "False/h.mindrecord").read_bytes()
    assert set(packed) == {"input_ids", "labels", "segment_ids"} and packed["input_ids"].shape[1] == width

    def is_padding(ids, labels):
        return (ids == 0) & (labels == -100)

    conversation = 0
    previous_used = None
    for ids, labels, segments in zip(packed["input_ids"], packed["labels"], packed["segment_ids"]):
        used = int(np.count_nonzero(segments))
        assert used and np.array_equal(segments[:used] > 0, np.ones(used, bool)) and is_padding(ids, labels)[used:].all()
        assert np.all(np.diff(segments[:used]) >= 0) and np.all(np.diff(segments[:used]) <= 1) and segments[0] == 1
        for k in range(1, segments.max() + 1):
            at = np.flatnonzero(segments == k)
            start, n = at[0], len(at)
            alone_ids, alone_labels = plain["input_ids"][conversation], plain["labels"][conversation]
            assert np.array_equal(ids[at], alone_ids[:n]) and labels[start] == -100
            assert np.array_equal(labels[at][1:], alone_labels[1:n])
            assert is_padding(alone_ids, alone_labels)[n:].all()  # the whole conversation is there
            if k == 1 and previous_used is not None:
                assert previous_used + n > width  # it did not fit in the row before
            conversation += 1
        previous_used = used
    assert conversation == len(plain["input_ids"]) == stats["packing"]["conversations"]
    assert stats["packing"]["rows"] == len(packed["input_ids"]) < stats["packing"]["rows_unpacked"]
    real = int(np.count_nonzero(packed["segment_ids"]))
    assert stats["packing"]["padding_fraction"] == round(1 - real / packed["segment_ids"].size, 4)
    assert stats["packing"]["padding_fraction"] < stats["packing"]["padding_fraction_unpacked"]


def test_packing_and_flash_attention_are_refused_together(tmp_path):
    from conftest import default_config, write_config

    from lorapipe.config import load_config
    from lorapipe.errors import ConfigError

    cfg = default_config()
    cfg["data"]["packing"] = True
    cfg["device_target"], cfg["train"]["use_flash_attention"] = "Ascend", True
    with pytest.raises(ConfigError, match="data.packing needs train.use_flash_attention: false"):
        load_config(write_config(tmp_path / "c.yaml", cfg))


def test_the_rendered_yaml_reads_the_segment_ids_only_when_packing(tiny_base_dir):
    from conftest import default_config

    from lorapipe.train.mindformers_yaml import render_mindformers_config

    cfg = default_config()
    hf_config = json.loads((tiny_base_dir / "config.json").read_text())
    par = {"data_parallel": 2, "model_parallel": 1, "pipeline_stage": 1, "max_device_memory": None}
    common = dict(tokenizer=tiny_base_dir / "tokenizer.model", base_ckpt_dir="ckpt", train_data="t.mindrecord",
                  seq_length=64, name="tiny", lora=cfg["lora"], train=cfg["train"], parallel=par, device_target="CPU",
                  position_embedding="rope")
    plain, packed = (render_mindformers_config(hf_config, packing=p, **common) for p in (False, True))
    assert plain["train_dataset"]["input_columns"] == ["input_ids", "labels"]
    assert "packing" not in plain["model"]["model_config"]
    assert packed["train_dataset"]["input_columns"] == ["input_ids", "labels", "segment_ids"]
    assert packed["train_dataset_task"]["dataset_config"]["input_columns"] == packed["train_dataset"]["input_columns"]
    assert packed["model"]["model_config"]["packing"] is True
