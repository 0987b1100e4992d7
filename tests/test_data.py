"""Chat data -> MindRecord: the recipe's rows byte for byte, every input layout, weighted sources, drop
reasons, control-token text, and every kind of bad input."""

import json
import logging
import runpy
import sys

import mindspore.dataset as ds
import numpy as np
import pytest
from conftest import REPO, SAMPLE_DATA
from recipe_r10 import recipe_rows

from lorapipe.config import canonical, load_yaml, validate
from lorapipe.data.conversations import is_heldout
from lorapipe.data.pipeline import preprocess_conversations
from lorapipe.data.rows import TokenizedConversations, assemble_rows
from lorapipe.data.sources import draws_samples, input_files
from lorapipe.data.turns import DROPPABLE, KINDS, Conversation
from lorapipe.errors import ConfigError, InputError
from lorapipe.formats.mindrecord import SCHEMA, MindRecordWriter
from lorapipe.model.tokenizer import ChatTokenizer

M = -100  # masked label
SAMPLE = json.loads(SAMPLE_DATA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    return ChatTokenizer(tiny_base_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def tokenizer_file(tiny_base_dir):
    return tiny_base_dir / "tokenizer.model"


def recipe_row(messages, tok, seq_length):
    """r1.0's row of one BELLE conversation (tests/recipe_r10.py)."""
    return recipe_rows([{"conversations": messages}], tok.sp, seq_length, tok.user, tok.assistant)[0]


def rows_of(turn_lists, tok, seq_length, is_user=None):
    """assemble_rows over conversations given as lists of turn texts (user first, alternating, unless
    is_user gives each conversation's roles)."""
    conversations = [Conversation(is_user[i] if is_user else [t % 2 == 0 for t in range(len(turns))], list(turns),
                                  {}, i, "x", i) for i, turns in enumerate(turn_lists)]
    tokens = TokenizedConversations(conversations, tok)
    return assemble_rows(tokens, np.arange(len(conversations)), tok, seq_length), tokens


def read_rows(path):
    return [(r["input_ids"], r["labels"])
            for r in ds.MindDataset(str(path), shuffle=False).create_dict_iterator(output_numpy=True)]


def preprocess(tmp_path, train, tokenizer_file, seq_length=32, name="out", **kwargs):
    """(stats, rows of the train MindRecord) of one preprocessing run into tmp_path/name/."""
    out = tmp_path / name / "train.mindrecord"
    stats = preprocess_conversations(train, tokenizer_file, out, seq_length, **kwargs)
    return stats, read_rows(out)


def write_json(path, records, lines=False):
    # (text as it is, but a lone surrogate, which UTF-8 cannot hold, as JSON's escape)
    text = "\n".join(json.dumps(r, ensure_ascii=False).encode("utf-8", "backslashreplace").decode()
                     for r in records) if lines else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return path


# -- the row layout -----------------------------------------------------------------------------------

def test_special_ids_are_looked_up_by_piece(tok):
    assert tok.sp.id_to_piece(tok.user) == "<reserved_106>"
    assert tok.sp.id_to_piece(tok.assistant) == "<reserved_107>"
    assert tok.sp.id_to_piece(tok.eos) == "</s>"


def test_multi_turn_layout(tok):
    (inp, lab), tokens = rows_of([["Hi", "Hello!", "2+2?", "4"], ["Bye", "Ciao"]], tok, seq_length=40)
    q1, a1, q2, a2 = tok.encode(["Hi", "Hello!", "2+2?", "4"])
    u, a, e = tok.user, tok.assistant, tok.eos
    want_inp = [u, *q1, a, *a1, u, *q2, a, *a2, e]
    want_lab = [e, *[M] * len(q1), M, *a1, e, *[M] * len(q2), M, *a2, e]
    assert tokens.length[0] == len(want_inp)
    assert inp[0].tolist() == want_inp + [0] * (41 - len(want_inp))
    assert lab[0].tolist() == want_lab + [M] * (41 - len(want_lab))
    assert inp.dtype == lab.dtype == np.int32 and inp.shape == (2, 41)
    assert inp[1].tolist()[:2] == [u, *tok.encode(["Bye"])[0]][:2]


def test_truncation_cuts_the_final_eos(tok):
    (inp, lab), tokens = rows_of([["What is the capital of France?", "The capital of France is Paris."]], tok, 8)
    q, r = tok.encode(["What is the capital of France?", "The capital of France is Paris."])
    full_inp = [tok.user, *q, tok.assistant, *r, tok.eos]
    full_lab = [tok.eos, *[M] * len(q), M, *r, tok.eos]
    assert tokens.length[0] == len(full_inp) > 9
    assert inp[0].tolist() == full_inp[:9] and lab[0].tolist() == full_lab[:9]
    assert tok.eos not in inp[0].tolist()[1:]


@pytest.mark.parametrize("seq_length", [8, 64])  # most rows truncated; none
def test_rows_are_the_recipes_byte_for_byte(tmp_path, tok, tokenizer_file, seq_length):
    stats, rows = preprocess(tmp_path, SAMPLE_DATA, tokenizer_file, seq_length)
    assert len(rows) == len(SAMPLE) == stats["train"]["samples"]
    for record, (inp, lab) in zip(SAMPLE, rows):
        want_inp, want_lab = recipe_row(record["conversations"], tok, seq_length)
        assert inp.tobytes() == want_inp.tobytes() and lab.tobytes() == want_lab.tobytes()
    assert stats["train"]["label_tokens"] == sum(int((lab != M).sum()) for _, lab in rows)
    lengths = [sum(len(ids) + 1 for ids in tok.encode(m["value"] for m in r["conversations"])) + 1 for r in SAMPLE]
    assert stats["train"]["truncated"] == sum(n > seq_length + 1 for n in lengths)
    assert stats["train"]["length_max"] == max(lengths)


def test_mindrecord_splits_schema_and_stats(tiny_base_dir, tmp_path, tokenizer_file):
    out, held = tmp_path / "belle_32.mindrecord", tmp_path / "belle_32_heldout.mindrecord"
    stats = preprocess_conversations(SAMPLE_DATA, tokenizer_file, out, 32, heldout_file=held,
                                     heldout_fraction=0.1, split_seed=0, stats_file=tmp_path / "stats.json")
    assert (tmp_path / "belle_32.mindrecord.db").is_file() and (tmp_path / "belle_32_heldout.mindrecord.db").is_file()
    heldout = [r for r in SAMPLE if is_heldout(r["id"], 0.1, 0)]
    assert stats["train"]["samples"] == len(SAMPLE) - len(heldout) and stats["heldout"]["samples"] == len(heldout) > 0
    assert json.loads((tmp_path / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert sum(stats["train"]["length_histogram"]["counts"]) == stats["train"]["samples"]
    assert stats["sources"] == [{"path": str(SAMPLE_DATA), "weight": 1.0, "records": 324, "dropped": 0,
                                 "questionable": 0, "files": [{"file": str(SAMPLE_DATA), "format": "belle", "records": 324}],
                                 "control_text_records": 0, "train_rows": 324 - len(heldout),
                                 "heldout_rows": len(heldout)}]
    assert stats["skipped"] == 0 and set(stats["drop_reasons"].values()) == {0}
    assert stats["questionable_records"] == 0 and set(stats["questionable_kinds"].values()) == {0}
    assert read_rows(out)[0][0].shape == (33,)


def test_heldout_split_is_stable_under_reordering(tmp_path, tokenizer_file):
    def heldout_ids(records, name):
        path = write_json(tmp_path / f"{name}.json", records)
        preprocess_conversations(path, tokenizer_file, tmp_path / name / "t.mindrecord", 16,
                                 heldout_file=tmp_path / name / "h.mindrecord", heldout_fraction=0.1)
        return sorted(r[0].tobytes() for r in read_rows(tmp_path / name / "h.mindrecord"))

    assert heldout_ids(SAMPLE, "forward") == heldout_ids(SAMPLE[::-1], "reversed")


# -- input layouts ------------------------------------------------------------------------------------

def as_alpaca(record):
    turns = [m["value"] for m in record["conversations"]]
    history = [[q, a] for q, a in zip(turns[:-2:2], turns[1:-2:2])]
    return {"instruction": turns[-2], "input": "", "output": turns[-1], **({"history": history} if history else {})}


def as_sharegpt(record, user="human", assistant="gpt"):
    return {"id": record["id"], "conversations": [
        {"from": user if m["from"] == "human" else assistant, "value": m["value"]} for m in record["conversations"]]}


def as_messages(record):
    return {"messages": [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]}
                         for m in record["conversations"]]}


def test_every_layout_gives_the_rows_of_the_equivalent_belle_file(tmp_path, tokenizer_file):
    belle = [as_sharegpt(r, "human", "assistant") for r in SAMPLE[:80]] + [as_sharegpt(r) for r in SAMPLE[-20:]]
    _, want = preprocess(tmp_path, write_json(tmp_path / "belle.json", belle), tokenizer_file, name="belle")
    assert any(len(r["conversations"]) > 2 for r in belle)  # multi-turn: Alpaca's history
    inputs = [  # (file, its format, what auto-detection calls it: belle and sharegpt are one layout)
        (write_json(tmp_path / "alpaca.json", [as_alpaca(r) for r in belle]), "alpaca", "alpaca"),
        (write_json(tmp_path / "sharegpt.jsonl", [as_sharegpt(r) for r in belle], lines=True), "sharegpt", "belle"),
        (write_json(tmp_path / "messages.jsonl", [as_messages(r) for r in belle], lines=True), "messages", "messages"),
        (write_json(tmp_path / "lines.json", belle, lines=True), "belle", "belle"),  # JSON Lines named .json
    ]
    for path, data_format, detected in inputs:
        for given in ("auto", data_format):
            stats, rows = preprocess(tmp_path, path, tokenizer_file, name=f"{path.name}-{given}", data_format=given)
            assert [(i.tobytes(), l.tobytes()) for i, l in rows] == [(i.tobytes(), l.tobytes()) for i, l in want]
            assert stats["sources"][0]["files"][0]["format"] == (detected if given == "auto" else given)


def test_system_prompt_and_alpaca_input_join_the_first_user_turn(tmp_path, tokenizer_file):
    belle = [{"conversations": [{"from": "human", "value": "Be brief.\nName a colour."},
                                {"from": "assistant", "value": "Red."}]},
             {"conversations": [{"from": "human", "value": "Translate.\ncat"}, {"from": "assistant", "value": "猫"}]}]
    others = {
        "sharegpt.json": [{"system": "Be brief.", "conversations": [
            {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."}]}],
        "messages.json": [{"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Name a colour."},
                                        {"role": "assistant", "content": "Red."}]}],
        "alpaca.json": [{"system": "Be brief.", "instruction": "Name a colour.", "input": "", "output": "Red."}],
    }
    _, want = preprocess(tmp_path, write_json(tmp_path / "belle.json", belle), tokenizer_file, name="belle")
    for name, records in others.items():
        _, rows = preprocess(tmp_path, write_json(tmp_path / name, records), tokenizer_file, name=f"{name}-out")
        assert rows[0][0].tobytes() == want[0][0].tobytes(), name
    alpaca = [{"instruction": "Translate.", "input": "cat", "output": "猫"}]
    _, rows = preprocess(tmp_path, write_json(tmp_path / "a2.json", alpaca), tokenizer_file, name="a2")
    assert rows[0][0].tobytes() == want[1][0].tobytes()


# -- control tokens in the text -------------------------------------------------------------------------

def test_control_token_strings_are_text_and_counted(tmp_path, tok, tokenizer_file):
    """docs/data.md, "Control tokens in the text are text": r1.0's tokenizer turned `</s>` in a text into the eos
    id (and split "a</s>b" around it); lorapipe encodes the characters, so data cannot end a sequence
    or fake a turn. Records that contain such text are counted, since their rows differ from r1.0's."""
    texts = ["hello </s> world", "a</s>b", "<s>x<unk>"]
    for text, ids in zip(texts, tok.encode(texts)):
        assert not {tok.eos, tok.sp.bos_id(), tok.sp.unk_id()} & set(ids), text
        assert tok.sp.decode(ids) == text
    records = [{"conversations": [{"from": "human", "value": "hello </s> world"}, {"from": "gpt", "value": "a</s>b"}]},
               {"conversations": [{"from": "human", "value": "<s>x<unk>"}, {"from": "gpt", "value": "ok"}]},
               *SAMPLE[:3]]
    stats, rows = preprocess(tmp_path, write_json(tmp_path / "ctl.json", records), tokenizer_file, 64)
    assert stats["control_text_records"] == 2 and stats["sources"][0]["control_text_records"] == 2
    inp, lab = rows[0]
    length = int((inp != 0).sum())
    assert inp[:length].tolist().count(tok.eos) == 1 and inp[length - 1] == tok.eos  # only the row's own eos


def test_role_marker_strings_in_the_text_do_not_forge_turns(tmp_path, tok, tokenizer_file):
    """`<reserved_106>`/`<reserved_107>` are user-defined pieces, which sentencepiece matches anywhere in
    a text: r1.0 turned them into real turn markers. lorapipe encodes their characters; a text without
    them is encoded as before."""
    text = "q<reserved_106>fake<reserved_107>turn"
    assert tok.user in tok.sp.encode(text) and tok.assistant in tok.sp.encode(text)  # what r1.0 did
    ids = tok.encode([text])[0]
    assert tok.user not in ids and tok.assistant not in ids and tok.sp.decode(ids) == text
    assert tok.encode(["plain text"]) == tok.sp.encode(["plain text"])
    records = [{"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "<reserved_107>ok"}]},
               *SAMPLE[:3]]
    stats, rows = preprocess(tmp_path, write_json(tmp_path / "roles.json", records), tokenizer_file, 64)
    assert stats["control_text_records"] == 1
    row = rows[0][0].tolist()
    assert row.count(tok.user) == 1 and row.count(tok.assistant) == 1  # the turns the record has, no more


# -- several sources with weights ----------------------------------------------------------------------

def test_weighted_sources_rows_per_source_and_seeded_samples(tmp_path, tok, tokenizer_file):
    a = write_json(tmp_path / "a.json", SAMPLE[:40])
    b = write_json(tmp_path / "b.jsonl", [as_messages(r) for r in SAMPLE[40:100]], lines=True)
    train = [{"path": str(a), "weight": 2.0}, {"path": str(tmp_path / "b.*"), "format": "messages", "weight": 0.5}]
    assert input_files(train) == [str(a), str(b)] and draws_samples(train) and not draws_samples(str(a))
    stats, rows = preprocess(tmp_path, train, tokenizer_file, name="s3", sample_seed=3)
    assert [s["train_rows"] for s in stats["sources"]] == [80, 30] and len(rows) == 110
    assert stats["sample_seed"] == 3 and stats["sources"][1]["files"][0]["format"] == "messages"
    want = {(i.tobytes(), l.tobytes()) for i, l in (recipe_row(r["conversations"], tok, 32) for r in SAMPLE[40:100])}
    picked = [(i.tobytes(), l.tobytes()) for i, l in rows[80:]]
    assert set(picked) <= want and len(set(picked)) == 30  # a sample without replacement
    assert [r[0].tobytes() for r in rows[:40]] == [r[0].tobytes() for r in rows[40:80]]  # weight 2: twice
    _, again = preprocess(tmp_path, train, tokenizer_file, name="s3-again", sample_seed=3)
    _, other = preprocess(tmp_path, train, tokenizer_file, name="s4", sample_seed=4)
    assert [r[0].tobytes() for r in again] == [r[0].tobytes() for r in rows]
    assert [r[0].tobytes() for r in other[80:]] != picked


def test_data_train_config_forms(tmp_path):
    schema = load_yaml(REPO / "config" / "schema.yaml")
    cfg = load_yaml(REPO / "config" / "config.yaml")
    cfg["data"]["train"] = [{"path": "./data/a.jsonl", "format": "alpaca", "weight": 2}, {"path": "data//b*.json"}]
    validate(cfg)
    data = canonical(cfg, schema)["data"]
    assert data["train"] == [{"format": "alpaca", "path": "data/a.jsonl", "weight": 2.0}, {"path": "data/b*.json"}]
    assert str(data["train"][0]) == '{"format": "alpaca", "path": "data/a.jsonl", "weight": 2.0}'
    for bad, message in [([{"path": "a", "weight": 0}], "data.train.0.weight"),
                         ([{"path": "a", "format": "csv"}], "data.train.0.format"),
                         ([{"file": "a"}], "unknown key data.train.0.file"), ([], "data.train")]:
        cfg["data"]["train"] = bad
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            validate(cfg)


def test_data_drop_config_names_the_kinds_of_record(tmp_path):
    schema = load_yaml(REPO / "config" / "schema.yaml")
    assert schema["properties"]["data"]["properties"]["drop"]["items"]["enum"] == list(DROPPABLE)
    for name in ("config.yaml", "tiny_13b.yaml", "baichuan2_7b_910b.yaml", "baichuan2_13b_910b.yaml"):
        assert load_yaml(REPO / "config" / name)["data"]["drop"] == []  # every record r1.0 trains on
    cfg = load_yaml(REPO / "config" / "config.yaml")
    cfg["data"]["drop"] = ["over length", "empty turn"]
    validate(cfg)
    for bad, message in [(["long"], "data.drop.0: 'long' is not one of"), (["empty turn"] * 2, "data.drop: "),
                         ("over length", "data.drop: 'over length' is not of type 'array'")]:
        cfg["data"]["drop"] = bad
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
    del cfg["data"]["drop"]
    with pytest.raises(ConfigError, match="missing required key data.drop"):
        validate(cfg)


# -- malformed, questionable and dropped records ----------------------------------------------------------

def turns(*pairs):
    return {"conversations": [{"from": f, "value": v} for f, v in pairs]}


MALFORMED = [  # (record, problem): what r1.0 crashes on
    ({"conversations": [{"from": "human"}]}, r"conversations\[0\] has no 'value'"),
    ({"conversations": [{"value": "x"}]}, r"conversations\[0\] has no 'from'"),
    (turns(("human", "a"), ("gpt", 3)), r"conversations\[1\]\.value must be a string, found int"),
    ({"conversations": ["human: a"]}, r"conversations\[0\] is not an object"),
    ({"id": 7}, "no 'conversations' list"),
    ({"conversations": "a"}, "'conversations' must be a list, found str"),
    # valid JSON ("\\ud800") that is no text: sentencepiece fails on it (issue 35), as r1.0 does
    (turns(("human", "\ud800 lone"), ("gpt", "b")), r"conversations\[0\]\.value holds an unpaired surrogate "
                                                    r"'\\ud800' at character 0"),
    (turns(("human", "a"), ("gpt", "b\udfff")), r"conversations\[1\]\.value holds an unpaired surrogate"),
    ({"system": "\udc00", **turns(("human", "a"), ("gpt", "b"))}, r"'system' holds an unpaired surrogate"),
]

QUESTIONABLE = [  # (record, its kinds): r1.0 trains on all of them
    ({"conversations": []}, ["empty conversation"]),
    (turns(("human", "a")), ["no assistant turn", "trailing user turn"]),
    (turns(("gpt", "Hi"), ("human", "Hello"), ("gpt", "Yes")), ["bad role order"]),
    (turns(("human", "a"), ("human", "b"), ("gpt", "c")), ["bad role order"]),
    (turns(("human", "a"), ("gpt", "b"), ("human", "c")), ["trailing user turn"]),
    (turns(("human", ""), ("gpt", "b")), ["empty turn"]),
    (turns(("human", "a"), ("gpt", " \n")), ["empty turn"]),
    (turns(("human", "a"), ("bot", "b")), ["unknown role"]),
    (turns(("user", "a"), ("assistant", "b")), ["user role"]),
    (turns(("system", "Be brief."), ("human", "a"), ("gpt", "b")), ["system prompt"]),
    ({"system": "Be brief.", **turns(("human", "a"), ("gpt", "b"))}, ["system prompt"]),
]


@pytest.mark.parametrize("record, problem", MALFORMED)
def test_a_malformed_record_fails_naming_file_and_index(tmp_path, tokenizer_file, record, problem):
    path = write_json(tmp_path / "in.json", [SAMPLE[0], record])
    with pytest.raises(InputError, match=rf"in\.json: record 1 \(belle format\): {problem}"):
        preprocess_conversations(path, tokenizer_file, tmp_path / "out" / "x.mindrecord", 16)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_questionable_records_are_kept_counted_and_the_first_logged(tmp_path, tok, tokenizer_file, caplog):
    """By default every questionable record gives r1.0's row (by the documented rules for user, system and
    unknown roles: tests/test_data.py documented()), is counted by kind, and the first five are logged."""
    records = [r for r, _ in QUESTIONABLE] + SAMPLE[:3]
    path = write_json(tmp_path / "q.jsonl", records, lines=True)
    with caplog.at_level(logging.WARNING, logger="lorapipe"):
        stats, rows = preprocess(tmp_path, path, tokenizer_file, 24)
    want = recipe_rows([documented(r) for r in records], tok.sp, 24, tok.user, tok.assistant)
    assert [(i.tobytes(), l.tobytes()) for i, l in rows] == [(i.tobytes(), l.tobytes()) for i, l in want]
    assert rows[0][0].tolist() == [tok.eos] + [0] * 24 and rows[0][1].tolist() == [tok.eos] + [M] * 24
    kinds = {kind: 0 for kind in KINDS}
    for _, record_kinds in QUESTIONABLE:
        for kind in record_kinds:
            kinds[kind] += 1
    assert stats["questionable_kinds"] == kinds and stats["questionable_records"] == len(QUESTIONABLE)
    assert stats["skipped"] == 0 and stats["sources"][0]["questionable"] == len(QUESTIONABLE)
    assert [(q["index"], q["kinds"], q["dropped"]) for q in stats["questionable_listed"]] == [
        (i, k, False) for i, (_, k) in enumerate(QUESTIONABLE)]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kept")]
    assert logged == [f"kept {path} record {i}, questionable: {stats['questionable_listed'][i]['problem']}"
                      for i in range(5)]
    assert logged[1] == (f"kept {path} record 1, questionable: no assistant turn: no assistant turn: nothing to "
                         f"learn but the markers and eos; trailing user turn: the last turn, 0, is a user turn with "
                         f"no answer")


def test_drop_leaves_out_the_kinds_it_names_and_skip_the_malformed(tmp_path, tok, tokenizer_file, caplog):
    long_answer = " ".join(["The capital of France is Paris."] * 40)
    records = SAMPLE[:10] + [r for r, _ in QUESTIONABLE] + [r for r, _ in MALFORMED] + [
        turns(("human", "Tell me"), ("gpt", long_answer))]
    path = write_json(tmp_path / "in.jsonl", records + ["not an object"], lines=True)
    path.write_text(path.read_text() + "\n{broken\n")
    drop = ["bad role order", "empty turn", "over length", "user role"]
    with caplog.at_level(logging.WARNING, logger="lorapipe"):
        stats, rows = preprocess(tmp_path, path, tokenizer_file, 128, on_bad_record="skip", drop=drop)
    kept = [r for r, k in QUESTIONABLE if not set(k) & set(drop)]
    assert len(rows) == 10 + len(kept) == stats["train"]["samples"]
    want = recipe_rows([documented(r) for r in SAMPLE[:10] + kept], tok.sp, 128, tok.user, tok.assistant)
    assert [i.tobytes() for i, _ in rows] == [i.tobytes() for i, _ in want]
    assert stats["drop"] == drop and stats["skipped"] == 5 + len(MALFORMED) + 2 + 1
    assert {k: n for k, n in stats["drop_reasons"].items() if n} == {
        "malformed": len(MALFORMED) + 2, "bad role order": 2, "empty turn": 2, "user role": 1, "over length": 1}
    # in file order, the over-length drops (found once tokenized) last; each with its reason
    listed = [(d["index"], d["reason"]) for d in stats["skipped_records"]]
    long = 21 + len(MALFORMED)  # the over-length record, then "not an object" and the broken line
    assert listed == [(12, "bad role order"), (13, "bad role order"), (15, "empty turn"), (16, "empty turn"),
                      (18, "user role"), *[(21 + i, "malformed") for i in range(len(MALFORMED))],
                      (long + 1, "malformed"), (long + 2, "malformed"), (long, "over length")]
    assert f"line {long + 3} is not JSON" in stats["skipped_records"][-2]["problem"]
    assert stats["skipped_records"][0]["problem"] == "bad role order: turn 0 is an assistant turn"
    assert all(d["file"] == str(path) for d in stats["skipped_records"])
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped")]
    assert len(logged) == 5
    assert logged[0] == f"dropped {path} record 12: bad role order: bad role order: turn 0 is an assistant turn"
    # without "over length" in drop the long conversation is truncated, as the recipe does
    stats, rows = preprocess(tmp_path, write_json(tmp_path / "long.json", records[-1:]), tokenizer_file, 128, name="t")
    assert stats["train"]["truncated"] == 1 and len(rows) == 1


def test_drop_names_known_kinds(tmp_path, tokenizer_file):
    with pytest.raises(InputError, match="data.drop: unknown kind 'long' "):
        preprocess_conversations(SAMPLE_DATA, tokenizer_file, tmp_path / "x.mindrecord", 16, drop=["long"])


def test_nothing_left_says_why_in_one_line(tmp_path, tokenizer_file):
    path = write_json(tmp_path / "in.json", [r for r, _ in MALFORMED] + [r for r, _ in QUESTIONABLE[:5]])
    with pytest.raises(InputError) as e:
        preprocess_conversations(path, tokenizer_file, tmp_path / "x.mindrecord", 16, on_bad_record="skip",
                                 drop=["empty conversation", "bad role order", "trailing user turn"])
    assert str(e.value) == (f"{path}: no conversations to train on: all {len(MALFORMED) + 5} records dropped "
                            f"(malformed {len(MALFORMED)}, empty conversation 1, bad role order 2, trailing user turn 2)")
    path = write_json(tmp_path / "long.json", SAMPLE[:5])
    with pytest.raises(InputError, match=r"all 5 records dropped \(over length 5\); over length: longer than "
                                         r"seq_length \+ 1 = 5 tokens$"):
        preprocess_conversations(path, tokenizer_file, tmp_path / "x.mindrecord", 4, drop=["over length"])


BAD_FILES = [
    (b'[{"id": 1, "conversations": [}]', r"bad.json: invalid JSON at line 1 column 30"),
    (b'{"id": 1}', "bad.json: expected a JSON array of conversations"),
    (b'[{"id": 1, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, {"id": 2}]',
     r"bad.json: record 1 \(belle format\): no 'conversations' list"),
    (b'[{"conversations": [{"from": "human"}]}]', r"bad.json: record 0 \(belle format\): conversations\[0\] has no 'value'"),
    (b'[{"conversations": [{"value": "x"}]}]', r"bad.json: record 0 \(belle format\): conversations\[0\] has no 'from'"),
    (b'[{"instruction": "x", "input": 3, "output": "y"}]', r"bad.json: record 0 \(alpaca format\): 'input' must be a string"),
    (b'[{"messages": [{"role": "user", "content": [{"type": "text"}]}]}]',
     r"bad.json: record 0 \(messages format\): messages\[0\].content must be a string, found list"),
    (b'[{"text": "x"}]', "bad.json: cannot tell the format: no record has a 'conversations', 'messages' or "
                         "'instruction' key; set data.format"),
    ('[{"conversations": [{"from": "human", "value": "caf\u00e9"}]}]'.encode("latin-1"),
     r"bad.json: line 1 \(byte \d+\): bytes that are not UTF-8"),
    (b"[]", r"bad.json: no conversations to train on \(no records\)"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_bad_input_is_named_and_leaves_nothing(tokenizer_file, tmp_path, content, message):
    (tmp_path / "bad.json").write_bytes(content)
    out = tmp_path / "out" / "x.mindrecord"
    with pytest.raises(InputError, match=message):
        preprocess_conversations(tmp_path / "bad.json", tokenizer_file, out, 16)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


VALID_JSON = [
    '[1, 23, -4.5e3, 1E+2, true, false, null, "x", [], {}, [[]], {"a": [1, {"b": "]"}]}]',
    ' \n\t[ {"a": "\\"],[{", "b": "\\u00e9\\ud83d\\ude00"} ,\r\n {"c": "北京😀e\u0301"}\n]\n ',
    '\ufeff[{"conversations": []}]',
    "[]",
    '[{"a": 1}]\n',
]
INVALID_JSON = ["[1 2]", "[1,]", "[", "[1,", '[{"a": }]', '[{"a" 1}]', '["abc', "[tru]", '[{"a": 1},\n\n  {bad}]',
                "", "  \n", '[1, 2, -]', '["a\\x"]', '[12345678901234567890, "\\u12"]']


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_a_json_array_is_read_incrementally_as_json_reads_it(tmp_path, monkeypatch, chunk):
    """iter_records parses a JSON array a window at a time (READ_CHUNK bytes, json's own scanner): any
    window size gives json.loads's records, and for invalid JSON its message, line and column."""
    import lorapipe.data.readers as data

    monkeypatch.setattr(data, "READ_CHUNK", chunk)
    path = tmp_path / "x.json"
    for text in VALID_JSON + [json.dumps(random_belle(__import__("random").Random(1), 30), ensure_ascii=False)]:
        path.write_text(text, encoding="utf-8")
        assert list(data.iter_records(path)) == json.loads(text.lstrip("\ufeff")), text
    for text in INVALID_JSON:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(json.JSONDecodeError) as e:
            json.loads(text)
        with pytest.raises(InputError) as ours:
            list(data.iter_records(path))
        assert str(ours.value) == f"{path}: invalid JSON at line {e.value.lineno} column {e.value.colno}: {e.value.msg}"
    path.write_text('[{"a": 1},\n {"b": 2}] {"c": 3}')
    with pytest.raises(InputError, match="line 2 column 12: more data after the JSON array"):
        list(data.iter_records(path))
    # bytes that are not UTF-8: the line and byte of the first, wherever the window ends
    path.write_bytes('[{"a": "é"},\n {"b": "x'.encode() + b"\xff\xfe" + b'"}]')
    with pytest.raises(InputError, match=r"x\.json: line 2 \(byte 23\): bytes that are not UTF-8 \(b'\\xff"):
        list(data.iter_records(path))
    path.write_bytes('[{"a": "é'.encode()[:-1])  # cut inside a character
    with pytest.raises(InputError, match=r"line 1 \(byte 8\): bytes that are not UTF-8"):
        list(data.iter_records(path))


def test_json_lines_are_read_a_line_at_a_time(tmp_path):
    """JSON Lines (or several values in a `.json` file): a record per line; a line that is not JSON is a
    malformed record; U+2028 inside a string does not end a line."""
    from lorapipe.data.readers import InvalidLine, iter_records

    for name in ("x.jsonl", "x.json"):
        path = tmp_path / name
        path.write_text('{"a": "x\u2028y"}\n\n  \n{"b":\n[1]\r\n', encoding="utf-8")
        records = list(iter_records(path))
        assert records[0] == {"a": "x\u2028y"} and records[2] == [1] and len(records) == 3
        assert isinstance(records[1], InvalidLine) and records[1].problem.startswith("line 4 is not JSON")
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(InputError, match=r"x\.json: line 2 \(byte 16\): bytes that are not UTF-8"):
        list(iter_records(path))


def test_memory_does_not_grow_with_the_records(tmp_path, tokenizer_file, monkeypatch):
    """No per-record object outlives its batch: the Python heap's peak over a run (tracemalloc) is the same
    for 300 and for 1,500 conversations, at small batches and read windows, with every kind of work on:
    a held-out split, a weight of 2.5 (two whole readings and a sample), a JSON array and JSON Lines, packing."""
    import tracemalloc

    from lorapipe.data import pipeline, readers

    monkeypatch.setattr(pipeline, "ROWS_PER_CHUNK", 64)
    monkeypatch.setattr(readers, "READ_CHUNK", 4096)

    def peak(count):
        records = [dict(SAMPLE[i % len(SAMPLE)], id=f"m{i}") for i in range(count)]
        train = [{"path": str(write_json(tmp_path / f"a{count}.json", records[::2])), "weight": 2.5},
                 {"path": str(write_json(tmp_path / f"b{count}.jsonl", records[1::2], lines=True))}]
        del records
        preprocess_conversations(train, tokenizer_file, tmp_path / "warm" / "t.mindrecord", 16)  # imports, caches
        tracemalloc.start()
        stats = preprocess_conversations(train, tokenizer_file, tmp_path / f"o{count}" / "t.mindrecord", 16,
                                         heldout_file=tmp_path / f"o{count}" / "h.mindrecord", heldout_fraction=0.1,
                                         sample_seed=1, packing=True)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert stats["train"]["samples"] > 1.5 * count
        return top

    small, large = peak(300), peak(1500)
    # allowed: 16 bytes per conversation; what grows is the sample's positions (8 bytes per sampled one)
    assert large - small < 16 * 1200, (small, large)


def test_rerun_replaces_output(tmp_path, tokenizer_file):
    path = write_json(tmp_path / "in.json", SAMPLE[:10])
    preprocess(tmp_path, path, tokenizer_file, 16)
    # MindRecord itself would refuse to overwrite; the atomic outputs replace it cleanly
    _, rows = preprocess(tmp_path, path, tokenizer_file, 24)
    assert len(rows) == 10 and rows[0][0].shape == (25,)


# -- the script ------------------------------------------------------------------------------------------

def run_script(monkeypatch, *args):
    """scripts/belle_preprocess.py's main() with these arguments, in this process (MindSpore is imported
    already); returns its exit status."""
    monkeypatch.setattr(sys, "argv", ["belle_preprocess.py", *map(str, args)])
    try:
        runpy.run_path(str(REPO / "scripts/belle_preprocess.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def test_script_takes_the_recipes_flags_or_the_config_data_section(tmp_path, tokenizer_file, monkeypatch):
    alpaca = write_json(tmp_path / "a.json", [as_alpaca(r) for r in SAMPLE[:30]])
    data = {"train": [{"path": str(SAMPLE_DATA)}, {"path": str(alpaca), "weight": 0.5}], "format": "auto",
            "seq_length": 16, "heldout_fraction": 0.0, "split_seed": 0, "on_bad_record": "fail", "drop": []}
    assert run_script(monkeypatch, "--data", json.dumps(data), "--sample_seed", 1, "--model_file", tokenizer_file,
                      "--output_file", tmp_path / "d.mindrecord", "--stats_file", tmp_path / "d.json") == 0
    stats = json.loads((tmp_path / "d.json").read_text())
    assert [s["train_rows"] for s in stats["sources"]] == [324, 15] and stats["seq_length"] == 16
    assert run_script(monkeypatch, "--input_glob", SAMPLE_DATA, "--seq_length", 16, "--model_file", tokenizer_file,
                      "--output_file", tmp_path / "r.mindrecord") == 0
    assert [r[0].tobytes() for r in read_rows(tmp_path / "r.mindrecord")] == \
        [r[0].tobytes() for r in read_rows(tmp_path / "d.mindrecord")][:324]
    assert run_script(monkeypatch, "--data", json.dumps(data), "--seq_length", 16, "--model_file", tokenizer_file,
                      "--output_file", tmp_path / "x.mindrecord") == 2  # one or the other
    # data.drop, or --drop with the recipe's flags
    assert run_script(monkeypatch, "--data", json.dumps({**data, "drop": ["over length"]}), "--model_file",
                      tokenizer_file, "--output_file", tmp_path / "o.mindrecord", "--stats_file", tmp_path / "o.json") == 0
    assert run_script(monkeypatch, "--input_glob", SAMPLE_DATA, "--seq_length", 16, "--drop", "over length",
                      "--model_file", tokenizer_file, "--output_file", tmp_path / "f.mindrecord",
                      "--stats_file", tmp_path / "f.json") == 0
    flag, config = (json.loads((tmp_path / name).read_text()) for name in ("f.json", "o.json"))
    assert flag["drop"] == config["drop"] == ["over length"] and flag["skipped"] == config["sources"][0]["dropped"] > 0
    assert len(read_rows(tmp_path / "f.mindrecord")) == 324 - flag["drop_reasons"]["over length"]


def test_workflow_passes_a_list_of_sources_and_train_seed_for_a_fractional_weight(tmp_path):
    from conftest import default_config, snakemake, write_config

    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(as_alpaca(r)) for r in SAMPLE[:20]))
    cfg = default_config()
    cfg["train"]["seed"] = 7
    cfg["data"]["train"] = [{"path": str(SAMPLE_DATA)}, {"path": str(tmp_path / "*.jsonl"), "weight": 0.5}]
    plan = snakemake(tmp_path, "-n", "-p", "mindrecord", configfile=write_config(tmp_path / "c.yaml", cfg)).stdout
    job = plan.split("rule mindrecord:")[1]
    assert f"input: {SAMPLE_DATA}, {tmp_path / 'alpaca.jsonl'}, results/tiny/tiny_base/tokenizer.model" in job
    assert f'"train": [{{"path": "{SAMPLE_DATA}"}}, {{"path": "{tmp_path}/*.jsonl", "weight": 0.5}}]' in job
    assert "--sample_seed 7 " in job
    assert f"--data {SAMPLE_DATA} {tmp_path / 'alpaca.jsonl'} " in plan.split("rule tiny_base:")[1]  # tokenizer data
    # (without a fractional weight the rule passes --sample_seed 0 and train.seed edits rebuild nothing: draws_samples)


def sql_dump(db_path):
    import sqlite3

    db = sqlite3.connect(db_path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def test_writer_writes_the_bytes_of_mindspores_file_writer(tmp_path):
    """MindRecordWriter hands MindSpore's C++ shard writer the blobs FileWriter would build (a batch
    serialised with numpy, not row by row in Python): the same file, byte for byte, and the same index
    (its own index writer's SQL dump is the generator's)."""
    from mindspore.mindrecord import FileWriter

    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, 1000, (300, 33), dtype=np.int32)
    labels = rng.integers(-100, 1000, (300, 33), dtype=np.int32)
    path = tmp_path / "x.mindrecord"  # (the header names the file: both are written under one name)
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema(SCHEMA, "belle_baichuan2")
    for start in range(0, 300, 100):  # (the batches need not be ours)
        writer.write_raw_data([{"input_ids": i, "labels": l}
                               for i, l in zip(input_ids[start:start + 100], labels[start:start + 100])])
    writer.commit()
    theirs, their_index = path.read_bytes(), sql_dump(f"{path}.db")
    ours = MindRecordWriter(path)
    for start in (0, 128, 256):
        ours.write(input_ids[start:start + 128], labels[start:start + 128])
    ours.commit()
    assert path.read_bytes() == theirs and sql_dump(f"{path}.db") == their_index
    assert len(their_index) == 300 + 5  # (BEGIN, two tables, the shard name, the primary key's index, COMMIT)
    with pytest.raises(ValueError, match="input_ids: expected int32 rows"):
        MindRecordWriter(tmp_path / "c.mindrecord").write(input_ids.astype(np.int64), labels)


def test_the_index_is_mindspores_for_any_page_layout(tmp_path):
    """write_index against MindSpore's index generator on a file of many small pages (several raw-data
    and blob pages, raw pages with several row groups): the same SQL dump; MindDataset reads every row."""
    import mindspore.dataset as ds
    from mindspore.mindrecord import FileWriter

    from lorapipe.formats.mindrecord import write_index

    rng = np.random.default_rng(1)
    rows = [rng.integers(-100, 1000, (2, int(n)), dtype=np.int32) for n in rng.integers(1, 12, 3000)]
    for name, index in (("theirs", None), ("ours", write_index)):
        (tmp_path / name).mkdir()
        writer = FileWriter(str(tmp_path / name / "x.mindrecord"), shard_num=1, overwrite=True)
        writer.set_page_size(1 << 15)
        writer.add_schema(SCHEMA, "belle_baichuan2")
        for start in range(0, len(rows), 1000):
            writer.write_raw_data([{"input_ids": r[0], "labels": r[1]} for r in rows[start:start + 1000]])
        if index is None:
            writer.commit()
        else:
            writer._flush = True
            writer._writer.commit()
            index(tmp_path / name / "x.mindrecord")
    with open(tmp_path / "ours" / "x.mindrecord", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    raw_pages = [p for p in header["page"] if p["page_type"] == "RAW_DATA"]
    assert len(raw_pages) > 1 and max(len(p["row_group_ids"]) for p in raw_pages) > 1
    assert sql_dump(tmp_path / "ours" / "x.mindrecord.db") == sql_dump(tmp_path / "theirs" / "x.mindrecord.db")
    read = [r["labels"] for r in ds.MindDataset(str(tmp_path / "ours" / "x.mindrecord"), shuffle=False)
            .create_dict_iterator(output_numpy=True)]
    assert len(read) == len(rows) and all((a == r[1]).all() for a, r in zip(read, rows))
    with pytest.raises(FileExistsError):
        write_index(tmp_path / "ours" / "x.mindrecord")


def test_a_split_left_empty_is_named(tmp_path, tokenizer_file):
    path = write_json(tmp_path / "in.json", SAMPLE[:3])
    with pytest.raises(InputError, match=r"in\.json: data\.heldout_fraction 0\.01 leaves no heldout rows from 3 "):
        preprocess_conversations(path, tokenizer_file, tmp_path / "t.mindrecord", 16,
                                 heldout_file=tmp_path / "h.mindrecord", heldout_fraction=0.01)
    with pytest.raises(InputError, match="and the source weights leave no train rows from 3 conversations"):
        preprocess_conversations([{"path": str(path), "weight": 0.1}], tokenizer_file, tmp_path / "t.mindrecord", 16)


# -- parity with r1.0 on random records -------------------------------------------------------------------

PIECES = ["the", "capital", "of", "France", "is", "Paris", "hello", "2+2=4", "?", "!", "北京", "你好", "世界",
          "法国的首都是巴黎。", "😀", "👍🏽", "e\u0301", "n\u0303", "Ελληνικά", "русский", "عربى", "\t", "\u3000",
          "\u2028", "{\"a\": [1]}", "\\n", "\"", "]", "[", ",", "</", "<reserved_1", "reserved_107>"]
CONTROL = ["</s>", "<s>", "<unk>", "<reserved_106>", "<reserved_107>"]


def random_text(rng):
    """Empty, whitespace only, or words of mixed scripts, now and then long (rows truncate) or with a
    control token or role marker inside."""
    draw = rng.random()
    if draw < 0.05:
        return ""
    if draw < 0.1:
        return rng.choice([" ", "  ", "\n", "\t \n", "\u3000", " \n "])
    count = rng.randint(30, 90) if draw > 0.93 else rng.randint(1, 6)
    words = [rng.choice(CONTROL) if rng.random() < 0.01 else rng.choice(PIECES) for _ in range(count)]
    return "".join(w + rng.choice(["", " ", " ", "\n"]) for w in words)


def random_belle(rng, count, roles=("human", "gpt", "assistant"), system=False):
    """BELLE records r1.0 takes: any number of turns, roles drawn from `roles` in any order (half of the
    records alternate human and assistant, human first, the way chats are written), empty conversations,
    with and without ids; with `system`, now and then a system key."""
    records = []
    for i in range(count):
        turns = 0 if rng.random() < 0.03 else rng.randint(1, 7)
        if rng.random() < 0.5:
            names = [rng.choice(roles) for _ in range(turns)]
        else:
            names = ["human" if t % 2 == 0 else rng.choice(roles[1:]) for t in range(turns)]
        record = {"conversations": [{"from": name, "value": random_text(rng)} for name in names]}
        if rng.random() < 0.9:
            record["id"] = f"r{i}"
        if system and rng.random() < 0.1:
            record["system"] = random_text(rng)
        records.append(record)
    return records


def documented(record):
    """The BELLE record whose r1.0 row is lorapipe's row of `record`, by the documented rules (docs/data.md, "Which
    rule applies to which record"): a `user` turn is a user turn; system text (the `system` key, then each
    system turn; empty text adds nothing) is joined with "\n" in front of the next turn's text when that is
    a user turn, else is a user turn of its own; any other name is the assistant, as in r1.0."""
    turns, pending = [], [record["system"]] if record.get("system") else []
    for message in record["conversations"]:
        name, value = ("human" if message["from"] in ("human", "user") else message["from"]), message["value"]
        if name == "system":
            pending += [value] if value else []
            continue
        if pending and name == "human":
            value = "\n".join([*pending, value])
        elif pending:
            turns.append({"from": "human", "value": "\n".join(pending)})
        pending = []
        turns.append({"from": name, "value": value})
    if pending:
        turns.append({"from": "human", "value": "\n".join(pending)})
    return {"conversations": turns}


def kinds_of(record):
    """The kinds of questionable record a BELLE record is (docs/data.md), worked out on its own here."""
    names = [m["from"] for m in record["conversations"]]
    turns = documented(record)["conversations"]
    user = [t["from"] == "human" for t in turns]
    return {kind for kind, is_it in [
        ("empty conversation", not turns),
        ("no assistant turn", turns and all(user)),
        ("bad role order", turns and (not user[0] or any(a == b for a, b in zip(user, user[1:])))),
        ("trailing user turn", turns and user[-1]),
        ("empty turn", any(not t["value"].strip() for t in turns)),
        ("unknown role", any(n not in ("human", "user", "gpt", "assistant", "system") for n in names)),
        ("user role", "user" in names),
        ("system prompt", "system" in names or bool(record.get("system"))),
    ] if is_it}


def differential(tmp_path, tok, tokenizer_file, records, seq_length):
    """Run `records` through r1.0's preprocess (by the documented rules) and through lorapipe with the
    default config, as a JSON array and as JSON Lines; assert every row is the same; return the stats."""
    want = recipe_rows([documented(r) for r in records], tok.sp, seq_length, tok.user, tok.assistant)
    array = write_json(tmp_path / "belle.json", records)
    stats, rows = preprocess(tmp_path, array, tokenizer_file, seq_length, name="array")
    assert len(rows) == len(records) == stats["train"]["samples"]
    differ = [i for i, ((inp, lab), (want_inp, want_lab)) in enumerate(zip(rows, want))
              if inp.tobytes() != want_inp.tobytes() or lab.tobytes() != want_lab.tobytes()]
    assert not differ, f"{len(differ)} rows differ from r1.0's, the first {differ[:10]}"
    # the same records as JSON Lines give the same file, byte for byte
    lines_stats, _ = preprocess(tmp_path, write_json(tmp_path / "belle.jsonl", records, lines=True), tokenizer_file,
                                seq_length, name="lines")
    assert (tmp_path / "lines" / "train.mindrecord").read_bytes() == (tmp_path / "array" / "train.mindrecord").read_bytes()
    assert {k: v for k, v in lines_stats.items() if k not in ("input", "sources", "questionable_listed")} == \
        {k: v for k, v in stats.items() if k not in ("input", "sources", "questionable_listed")}
    kinds = {kind: 0 for kind in KINDS}
    for record in records:
        for kind in kinds_of(record):
            kinds[kind] += 1
    assert stats["questionable_kinds"] == kinds
    assert stats["questionable_records"] == sum(bool(kinds_of(r)) for r in records)
    return stats


def test_rows_are_r10s_for_random_belle_records(tmp_path, tok, tokenizer_file):
    """The differential test: 3,000 seeded random BELLE records (any turn order, leading assistant and
    trailing user turns, repeated roles, empty and whitespace-only turns, empty conversations, mixed
    scripts, long texts that truncate, control-token and role-marker text) through r1.0's preprocess
    (tests/recipe_r10.py) and through lorapipe with the default config: every row the same."""
    import random

    records = random_belle(random.Random(23), 3000)
    stats = differential(tmp_path, tok, tokenizer_file, records, seq_length=40)
    assert stats["train"]["truncated"] > 100 and stats["control_text_records"] > 10
    assert min(stats["questionable_kinds"][k] for k in KINDS[:5]) > 50  # every kind r1.0 data can have


def test_unencodable_text_is_malformed_and_the_other_rows_are_r10s(tmp_path, tok, tokenizer_file):
    """Unpaired surrogates ("\\ud800", "\\udfff", a reversed pair) in turn values and system keys, among
    random records that also hold characters outside the BMP (surrogate pairs in the JSON, which are text):
    under on_bad_record skip exactly those records are dropped as malformed and counted, and every other
    row is r1.0's, from a JSON array and from JSON Lines alike."""
    import random

    rng = random.Random(35)
    records = random_belle(rng, 1200, system=True)
    bad = set()
    for i, record in enumerate(records):
        draw = rng.random()
        texts = [m for m in record["conversations"]]
        if draw < 0.04 and texts:
            turn = rng.choice(texts)
            at = rng.randint(0, len(turn["value"]))
            turn["value"] = turn["value"][:at] + rng.choice(["\ud800", "\udfff", "\ude00\ud83d"]) + turn["value"][at:]
            bad.add(i)
        elif draw < 0.05:
            record["system"] = "be\udc80brief"
            bad.add(i)
        elif draw < 0.15 and texts:
            rng.choice(texts)["value"] += rng.choice(["\U0001F600", "\U00020000", "\U0001D11E"])
    good = [r for i, r in enumerate(records) if i not in bad]
    want = recipe_rows([documented(r) for r in good], tok.sp, 40, tok.user, tok.assistant)
    for name, text in (("array", json.dumps(records)), ("lines", "\n".join(map(json.dumps, records)))):
        path = tmp_path / f"in.{'json' if name == 'array' else 'jsonl'}"
        path.write_text(text, encoding="utf-8")  # (json.dumps writes every surrogate as an escape)
        stats, rows = preprocess(tmp_path, path, tokenizer_file, 40, name=name, on_bad_record="skip")
        assert stats["drop_reasons"]["malformed"] == len(bad) > 30
        assert [(a.tobytes(), b.tobytes()) for a, b in rows] == [(a.tobytes(), b.tobytes()) for a, b in want]
    with pytest.raises(InputError, match=rf"in\.json: record {min(bad)} \(belle format\): .* holds an unpaired "
                                         rf"surrogate"):
        preprocess_conversations(tmp_path / "in.json", tokenizer_file, tmp_path / "fail" / "x.mindrecord", 40)


def test_role_names_and_system_text_follow_the_documented_rules(tmp_path, tok, tokenizer_file):
    """The same with `user`, `system` and unknown `from` values (a string or not) and `system` keys: the
    rows are r1.0's rows of the records rewritten by the documented rules (documented())."""
    import random

    roles = ("human", "gpt", "assistant", "user", "system", "bot", "model", None, 7)
    records = random_belle(random.Random(5), 1500, roles=roles, system=True)
    stats = differential(tmp_path, tok, tokenizer_file, records, seq_length=48)
    assert min(stats["questionable_kinds"][k] for k in ("unknown role", "user role", "system prompt")) > 100
