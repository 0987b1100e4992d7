"""BELLE JSON -> MindRecord: exact row layouts, the MindRecord itself, and every kind of bad input."""

import json

import mindspore.dataset as ds
import numpy as np
import pytest

from conftest import SAMPLE_DATA
from lorapipe.errors import InputError
from lorapipe.data import ChatTokenizer, build_row, preprocess_belle, split_records

M = -100  # masked label


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    return ChatTokenizer(tiny_base_dir / "tokenizer.model")


def row(tok, turns, seq_length):
    messages = [{"from": f, "value": v} for f, v in turns]
    ids = tok.encode([m["value"] for m in messages])
    return build_row(messages, ids, tok, seq_length), ids


def test_special_ids_are_looked_up_by_piece(tok):
    assert tok.sp.id_to_piece(tok.user) == "<reserved_106>"
    assert tok.sp.id_to_piece(tok.assistant) == "<reserved_107>"
    assert tok.sp.id_to_piece(tok.eos) == "</s>"


def test_multi_turn_layout(tok):
    (inp, lab, length), (q1, a1, q2, a2) = row(tok, [("human", "Hi"), ("gpt", "Hello!"), ("human", "2+2?"),
                                                     ("gpt", "4")], seq_length=40)
    u, a, e = tok.user, tok.assistant, tok.eos
    want_inp = [u, *q1, a, *a1, u, *q2, a, *a2, e]
    want_lab = [e, *[M] * len(q1), M, *a1, e, *[M] * len(q2), M, *a2, e]
    assert length == len(want_inp)
    assert inp.tolist() == want_inp + [0] * (41 - len(want_inp))
    assert lab.tolist() == want_lab + [M] * (41 - len(want_lab))
    assert inp.dtype == lab.dtype == np.int32


def test_conversation_starting_with_gpt_and_an_empty_value(tok):
    (inp, lab, _), (a1, q1) = row(tok, [("gpt", "Welcome."), ("human", "")], seq_length=12)
    assert q1 == []
    u, a, e = tok.user, tok.assistant, tok.eos
    want_inp = [a, *a1, u, e]
    want_lab = [M, *a1, e, e]
    assert inp.tolist()[:len(want_inp)] == want_inp and lab.tolist()[:len(want_lab)] == want_lab


def test_truncation_cuts_the_final_eos(tok):
    (inp, lab, length), (q, r) = row(tok, [("human", "What is the capital of France?"),
                                           ("gpt", "The capital of France is Paris.")], seq_length=8)
    full_inp = [tok.user, *q, tok.assistant, *r, tok.eos]
    full_lab = [tok.eos, *[M] * len(q), M, *r, tok.eos]
    assert length == len(full_inp) > 9
    assert inp.tolist() == full_inp[:9] and lab.tolist() == full_lab[:9]
    assert tok.eos not in inp.tolist()[1:]


def test_mindrecord_rows_schema_and_stats(tiny_base_dir, tmp_path, tok):
    out, held = tmp_path / "belle_32.mindrecord", tmp_path / "belle_32_heldout.mindrecord"
    stats = preprocess_belle(SAMPLE_DATA, tiny_base_dir / "tokenizer.model", out, 32, heldout_file=held,
                             heldout_fraction=0.1, split_seed=0, stats_file=tmp_path / "stats.json")
    assert (tmp_path / "belle_32.mindrecord.db").is_file() and (tmp_path / "belle_32_heldout.mindrecord.db").is_file()
    records = json.loads(SAMPLE_DATA.read_text())
    train, heldout = split_records(records, 0.1, 0)
    assert stats["train"]["samples"] == len(train) and stats["heldout"]["samples"] == len(heldout) > 0
    assert json.loads((tmp_path / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert sum(stats["train"]["length_histogram"]["counts"]) == len(train)
    got = list(ds.MindDataset(str(out), shuffle=False).create_dict_iterator(output_numpy=True))
    assert len(got) == len(train)
    for record, item in zip(train[:20], got):
        messages = record["conversations"]
        want_inp, want_lab, _ = build_row(messages, tok.encode(m["value"] for m in messages), tok, 32)
        assert item["input_ids"].dtype == np.int32 and item["input_ids"].shape == (33,)
        assert np.array_equal(item["input_ids"], want_inp) and np.array_equal(item["labels"], want_lab)
    assert stats["train"]["label_tokens"] == sum(int((g["labels"] != M).sum()) for g in got)


def test_heldout_split_is_stable_under_reordering():
    records = json.loads(SAMPLE_DATA.read_text())
    _, heldout = split_records(records, 0.1, 0)
    _, heldout_reversed = split_records(records[::-1], 0.1, 0)
    assert sorted(r["id"] for r in heldout) == sorted(r["id"] for r in heldout_reversed)


BAD_INPUTS = [
    (b'[{"id": 1, "conversations": [}]', r"bad.json: invalid JSON at line 1 column 30"),
    (b'{"id": 1}', "bad.json: expected a JSON array of conversations, found a dict"),
    (b'[{"id": 1, "conversations": [{"from": "human", "value": "x"}]}, {"id": 2}]',
     "bad.json: record 1: no 'conversations' list"),
    (b'[{"conversations": [{"from": "human"}]}]', r"bad.json: record 0: conversations\[0\] has no 'value'"),
    (b'[{"conversations": [{"value": "x"}]}]', r"bad.json: record 0: conversations\[0\] has no 'from'"),
    ('[{"conversations": [{"from": "human", "value": "caf\u00e9"}]}]'.encode("latin-1"),
     r"bad.json: line 1 \(byte \d+\): bytes that are not UTF-8"),
    (b"[]", "bad.json: no conversations to train on"),
]


@pytest.mark.parametrize("content, message", BAD_INPUTS)
def test_bad_input_is_named_and_leaves_nothing(tiny_base_dir, tmp_path, content, message):
    (tmp_path / "bad.json").write_bytes(content)
    out = tmp_path / "out" / "x.mindrecord"
    with pytest.raises(InputError, match=message):
        preprocess_belle(tmp_path / "bad.json", tiny_base_dir / "tokenizer.model", out, 16)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_skip_counts_bad_records_and_rerun_replaces_output(tiny_base_dir, tmp_path):
    records = json.loads(SAMPLE_DATA.read_text())[:10] + [{"id": "broken"}, {"conversations": []}]
    (tmp_path / "in.json").write_text(json.dumps(records))
    out = tmp_path / "x.mindrecord"
    with pytest.raises(InputError, match="record 10: no 'conversations' list"):
        preprocess_belle(tmp_path / "in.json", tiny_base_dir / "tokenizer.model", out, 16)
    stats = preprocess_belle(tmp_path / "in.json", tiny_base_dir / "tokenizer.model", out, 16,
                             on_bad_record="skip")
    assert stats["skipped"] == 2 and stats["train"]["samples"] == 10
    assert [s["index"] for s in stats["skipped_records"]] == [10, 11]
    # A rerun over existing output replaces it cleanly (MindRecord would refuse to overwrite).
    stats = preprocess_belle(tmp_path / "in.json", tiny_base_dir / "tokenizer.model", out, 24,
                             on_bad_record="skip")
    got = list(ds.MindDataset(str(out), shuffle=False).create_dict_iterator(output_numpy=True))
    assert len(got) == 10 and got[0]["input_ids"].shape == (25,)
