"""BELLE chat JSON -> MindRecord rows, exactly as the recipe's belle_preprocess.py builds them.

Row layout (seq_length N gives rows of N + 1 tokens; the model shifts them by one):
  human turn: input += [user] + ids,       labels += [eos] + [-100] * len(ids)
  other turn: input += [assistant] + ids,  labels += [-100] + ids
  then input += [eos], labels += [eos]; truncate to N + 1; pad input with 0 and labels with -100.
user/assistant are the ids of `<reserved_106>`/`<reserved_107>` looked up in the tokenizer.

Faster than the recipe (one batched, multi-threaded sentencepiece call; batched MindRecord writes)
and strict about bad input: every problem names the file and the record index.
"""

import glob
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from lorapipe.errors import InputError
from lorapipe.outputs import atomic_outputs
from lorapipe.spec import ASSISTANT_PIECE, USER_PIECE

log = logging.getLogger("lorapipe")

IGNORE_TOKEN_ID = -100
PAD_ID = 0
SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
WRITE_BATCH = 1000


# -- reading and checking -------------------------------------------------------------------------

def read_records(path):
    """The records of one BELLE chat JSON file; one clear InputError for unreadable input."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} (byte {e.start}): bytes that are not UTF-8 "
                         f"({raw[e.start:e.start + 4]!r}); BELLE JSON must be UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON array of conversations, found a {type(records).__name__}")
    return records


def record_problem(record):
    """Why a record is not a BELLE conversation, or None if it is one."""
    if not isinstance(record, dict):
        return f"expected an object, found a {type(record).__name__}"
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "no 'conversations' list" if conversations is None else "'conversations' must be a non-empty list"
    for j, message in enumerate(conversations):
        if not isinstance(message, dict):
            return f"conversations[{j}] is not an object"
        for key in ("from", "value"):
            if key not in message:
                return f"conversations[{j}] has no '{key}'"
            if not isinstance(message[key], str):
                return f"conversations[{j}].{key} must be a string"
    return None


def input_files(spec):
    """The files a data.train value names: a path, the matches of a glob (sorted), or a list of them."""
    files = []
    for item in spec if isinstance(spec, (list, tuple)) else [spec]:
        pattern = str(item)
        files += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    return files


def load_conversations(input_glob, on_bad_record="fail"):
    """(records, skipped) from every file matching `input_glob`, in sorted file order.

    A bad record fails the run (naming file and index) or, with on_bad_record="skip", is counted in
    `skipped` as {"file", "index", "problem"}.
    """
    files = input_files(input_glob)
    if not files:
        raise InputError(f"{input_glob}: no file matches")
    records, skipped = [], []
    for path in files:
        for index, record in enumerate(read_records(path)):
            problem = record_problem(record)
            if problem is None:
                records.append(record)
            elif on_bad_record == "skip":
                skipped.append({"file": str(path), "index": index, "problem": problem})
            else:
                raise InputError(f"{path}: record {index}: {problem}")
    if not records:
        raise InputError(f"{input_glob}: no conversations to train on"
                         + (f" ({len(skipped)} bad records skipped)" if skipped else ""))
    return records, skipped


def conversation_texts(files):
    """Every message text of BELLE files, in file order (tokenizer training input)."""
    records, _ = load_conversations(files)
    return [m["value"] for r in records for m in r["conversations"] if m["value"]]


def is_heldout(record_id, fraction, seed):
    """Whether a conversation belongs to the held-out split.

    Decided by a hash of (seed, id), not by position: adding, removing or reordering other records
    never moves a conversation between train and held-out.
    """
    digest = hashlib.sha256(f"{seed}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_records(records, fraction, seed):
    """(train, heldout) by is_heldout on each record's id (its position when it has none)."""
    train, heldout = [], []
    for index, record in enumerate(records):
        (heldout if is_heldout(record.get("id", index), fraction, seed) else train).append(record)
    return train, heldout


# -- tokens -----------------------------------------------------------------------------------------

class ChatTokenizer:
    """A sentencepiece model plus the ids the row layout needs, looked up by piece."""

    def __init__(self, model_file):
        import sentencepiece as spm

        if not Path(model_file).is_file():
            raise InputError(f"{model_file}: tokenizer model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise InputError(f"{model_file}: not a sentencepiece model ({e})") from None
        self.user, self.assistant = (self._id(model_file, p) for p in (USER_PIECE, ASSISTANT_PIECE))
        self.eos = self.sp.eos_id()
        if self.eos < 0:
            raise InputError(f"{model_file}: the tokenizer has no eos piece")

    def _id(self, model_file, piece):
        token = self.sp.piece_to_id(piece)
        if token == self.sp.unk_id() or self.sp.id_to_piece(token) != piece:
            raise InputError(f"{model_file}: the tokenizer has no piece {piece!r}")
        return token

    def encode(self, texts, num_threads=None):
        return self.sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)


def build_row(messages, value_ids, tok, seq_length):
    """(input_ids, labels, untruncated length) of one conversation: the recipe's layout."""
    input_ids, labels = [], []
    for message, ids in zip(messages, value_ids):
        if message["from"] == "human":
            input_ids += [tok.user] + ids
            labels += [tok.eos] + [IGNORE_TOKEN_ID] * len(ids)
        else:
            input_ids += [tok.assistant] + ids
            labels += [IGNORE_TOKEN_ID] + ids
    input_ids.append(tok.eos)
    labels.append(tok.eos)
    length, width = len(input_ids), seq_length + 1
    input_ids = input_ids[:width] + [PAD_ID] * (width - length)
    labels = labels[:width] + [IGNORE_TOKEN_ID] * (width - length)
    return np.array(input_ids, np.int32), np.array(labels, np.int32), length


def tokenize_records(records, tok, seq_length, num_threads=None):
    """[(input_ids, labels, length)] for records, with one batched sentencepiece call."""
    ids = tok.encode((m["value"] for r in records for m in r["conversations"]), num_threads)
    rows, at = [], 0
    for record in records:
        n = len(record["conversations"])
        rows.append(build_row(record["conversations"], ids[at:at + n], tok, seq_length))
        at += n
    return rows


# -- writing ----------------------------------------------------------------------------------------

def write_mindrecord(path, rows, description="belle_baichuan2"):
    """Write rows to `path` (+ `path`.db), WRITE_BATCH rows per call."""
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema(SCHEMA, description)
    for start in range(0, len(rows), WRITE_BATCH):
        writer.write_raw_data([{"input_ids": i, "labels": l} for i, l, _ in rows[start:start + WRITE_BATCH]])
    writer.commit()


def row_stats(rows, seq_length):
    """Counts for one split: samples, kept tokens, label tokens, truncation, length histogram."""
    lengths = np.array([length for _, _, length in rows])
    truncated = int((lengths > seq_length + 1).sum())
    edges = np.unique(np.linspace(0, max(int(lengths.max()), seq_length + 1), 11).astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    return {
        "samples": len(rows),
        "tokens": int(np.minimum(lengths, seq_length + 1).sum()),
        "label_tokens": int(sum((labels != IGNORE_TOKEN_ID).sum() for _, labels, _ in rows)),
        "truncated": truncated,
        "truncated_ratio": round(truncated / len(rows), 4),
        "length_max": int(lengths.max()),
        "length_mean": round(float(lengths.mean()), 1),
        "length_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def summary(stats):
    lines = [f"data: {stats['input']} -> rows of {stats['seq_length'] + 1} tokens, "
             f"{stats['skipped']} bad records skipped"]
    for split in ("train", "heldout"):
        s = stats.get(split)
        if s:
            lines.append(f"  {split:8} {s['samples']:7d} samples {s['tokens']:10d} tokens "
                         f"{s['label_tokens']:9d} label tokens, truncated {s['truncated']} "
                         f"({100 * s['truncated_ratio']:.1f}%), length mean {s['length_mean']} max {s['length_max']}")
    return "\n".join(lines)


def preprocess_belle(input_glob, model_file, output_file, seq_length, heldout_file=None,
                     heldout_fraction=0.0, split_seed=0, on_bad_record="fail", stats_file=None, run=None):
    """BELLE JSON -> `output_file` MindRecord (+ .db), optionally a held-out MindRecord and stats JSON.

    All outputs appear together, or none do.
    """
    if seq_length < 1:
        raise InputError(f"seq_length must be positive, got {seq_length}")
    tok = ChatTokenizer(model_file)
    records, skipped = load_conversations(input_glob, on_bad_record)
    splits = {"train": records}
    if heldout_file:
        splits["train"], splits["heldout"] = split_records(records, heldout_fraction, split_seed)
        for split, records_ in splits.items():
            if not records_:
                raise InputError(f"{input_glob}: data.heldout_fraction {heldout_fraction} leaves no {split} "
                                 f"records out of {len(records)}")
    files = {"train": Path(output_file), "heldout": Path(heldout_file) if heldout_file else None}
    outputs = [files["train"], Path(f"{files['train']}.db")]
    if heldout_file:
        outputs += [files["heldout"], Path(f"{files['heldout']}.db")]
    if stats_file:
        outputs.append(Path(stats_file))
    stats = {"input": str(input_glob), "seq_length": seq_length, "skipped": len(skipped),
             "skipped_records": skipped[:100]}
    with atomic_outputs(outputs, run=run, inputs=[*input_files(input_glob), model_file]) as temps:
        temp_of = dict(zip(outputs, temps))
        for split, split_rows in splits.items():
            rows = tokenize_records(split_rows, tok, seq_length)
            stats[split] = row_stats(rows, seq_length)
            write_mindrecord(temp_of[files[split]], rows)
            log.info("wrote %d %s rows", len(rows), split)
        if stats_file:
            temp_of[Path(stats_file)].write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
    log.info("%s", summary(stats))
    return stats
