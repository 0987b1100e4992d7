"""Chat data -> MindRecord rows, exactly as the recipe's belle_preprocess.py builds them.

Input: JSON or JSON Lines files in one of four layouts (FORMATS), detected per file or named:
  belle, sharegpt  {"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value"}...],
                    optional "system"}: one layout under the two names users know it by
  alpaca           {"instruction", "input", "output", optional "history": [[q, a]...], optional "system"};
                   the user turn is instruction, plus "\\n" + input when input is not empty
  messages         {"messages": [{"role": "system"|"user"|"assistant", "content"}...]} (OpenAI)
Every layout becomes the same Conversation: user and assistant turns alternating, user first, assistant
last. Baichuan2's template has no system token, so a system prompt is prepended to the first user turn
followed by "\\n".

Row layout (seq_length N gives rows of N + 1 tokens; the model shifts them by one):
  user turn:      input += [user] + ids,       labels += [eos] + [-100] * len(ids)
  assistant turn: input += [assistant] + ids,  labels += [-100] + ids
  then input += [eos], labels += [eos]; truncate to N + 1; pad input with 0 and labels with -100.
user/assistant are the ids of `<reserved_106>`/`<reserved_107>` looked up in the tokenizer.

Literal `</s>`, `<s>`, `<unk>` and the role markers in the text are encoded as text, never as control or
marker ids (DESIGN.md, "Control tokens in data are text"); records containing them are counted in the
stats.

A record that cannot be trained on fails the run naming its file and index, or with on_bad_record
"skip" is dropped with one of DROP_REASONS; so is, with "skip", a conversation longer than a row.
"""

import glob
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from lorapipe.errors import InputError
from lorapipe.outputs import atomic_outputs
from lorapipe.spec import ASSISTANT_PIECE, USER_PIECE

log = logging.getLogger("lorapipe")

IGNORE_TOKEN_ID = -100
PAD_ID = 0
SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
FORMATS = ("belle", "sharegpt", "alpaca", "messages")
CONTROL_TEXTS = ("</s>", "<s>", "<unk>", USER_PIECE, ASSISTANT_PIECE)
# The role markers are user-defined pieces: sentencepiece matches them anywhere in a text.
ROLE_MARKER = re.compile(f"({re.escape(USER_PIECE)}|{re.escape(ASSISTANT_PIECE)})")
MALFORMED, BAD_ORDER, EMPTY_TURN, NO_ASSISTANT, OVER_LENGTH = (
    "malformed", "bad role order", "empty turn", "no assistant turn", "over length")
DROP_REASONS = (MALFORMED, BAD_ORDER, EMPTY_TURN, NO_ASSISTANT, OVER_LENGTH)
LOGGED_DROPS = 5      # the first drops are logged with file and index; all are counted
LISTED_DROPS = 100    # ... and this many are listed in the stats JSON
ROWS_PER_CHUNK = 4096  # rows assembled and written at a time: memory stays flat for any data size


# -- sources and files ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One entry of data.train: a file or glob, its layout ("auto": detected per file) and its weight,
    the expected number of times each of its conversations appears in the training split."""
    path: str
    format: str = "auto"
    weight: float = 1.0


def parse_sources(train, data_format="auto"):
    """[Source] for a data.train value: a path or glob, or a list of paths or {path, format, weight}."""
    sources = []
    for item in train if isinstance(train, (list, tuple)) else [train]:
        if isinstance(item, Source):
            sources.append(item)
        elif isinstance(item, dict):
            sources.append(Source(str(item["path"]), item.get("format", data_format),
                                  float(item.get("weight", 1.0))))
        else:
            sources.append(Source(str(item), data_format))
    for source in sources:
        if source.format not in ("auto", *FORMATS):
            raise InputError(f"{source.path}: unknown format {source.format!r} (expected auto or "
                             f"{', '.join(FORMATS)})")
        if not source.weight > 0:
            raise InputError(f"{source.path}: weight must be positive, got {source.weight}")
    return sources


def input_files(train):
    """The files a data.train value names (a path, a glob's sorted matches, or a list of sources)."""
    files = []
    for source in parse_sources(train):
        files += sorted(glob.glob(source.path)) if glob.has_magic(source.path) else [source.path]
    return files


def draws_samples(train):
    """Whether a data.train value has a fractional weight, whose sample is drawn with a seed."""
    return any(source.weight % 1 for source in parse_sources(train))


class _InvalidLine:
    """A JSON Lines line that is not JSON: a malformed record, dropped or reported like any other."""

    def __init__(self, problem):
        self.problem = problem


def read_records(path):
    """The records of one JSON (an array) or JSON Lines file; one clear InputError for unreadable input."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} (byte {e.start}): bytes that are not UTF-8 "
                         f"({raw[e.start:e.start + 4]!r}); chat data must be UTF-8") from None
    if path.suffix not in (".jsonl", ".ndjson"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # a second value after the first: JSON Lines under a .json name
                raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        else:
            if not isinstance(records, list):
                raise InputError(f"{path}: expected a JSON array of conversations (or JSON Lines), "
                                 f"found a {type(records).__name__}")
            return records
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(_InvalidLine(f"line {number} is not JSON ({e.msg} at column {e.colno})"))
    return records


def detect_format(path, records):
    """The layout of a file, from the first record that has one of the layouts' keys."""
    for record in records:
        if isinstance(record, dict):
            if "conversations" in record:
                return "belle"
            if "messages" in record:
                return "messages"
            if "instruction" in record:
                return "alpaca"
    raise InputError(f"{path}: cannot tell the format: no record has a 'conversations', 'messages' or "
                     f"'instruction' key; set data.format to one of {', '.join(FORMATS)}")


# -- records -> conversations -------------------------------------------------------------------------

@dataclass(slots=True)
class Conversation:
    """User and assistant turns alternating, user first, assistant last (a system prompt already in
    the first user turn). `key` decides the held-out split; `source` indexes the data sources; `file`
    and `index` say where the record is."""
    turns: list
    key: object
    source: int
    file: str
    index: int


class BadRecord(Exception):
    """Why one record cannot be trained on: `reason` (one of DROP_REASONS) and the detail."""

    def __init__(self, reason, problem):
        super().__init__(problem)
        self.reason = reason


def _string(value, where):
    if not isinstance(value, str):
        raise BadRecord(MALFORMED, f"{where} must be a string, found {type(value).__name__}")
    return value


def _list(record, key):
    value = record.get(key)
    if value is None:
        raise BadRecord(MALFORMED, f"no '{key}' list")
    if not isinstance(value, list) or not value:
        raise BadRecord(MALFORMED, f"'{key}' must be a non-empty list")
    return value


def _system(record):
    return _string(record.get("system") or "", "'system'")


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
MESSAGES_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def _turns_of(messages, list_key, role_key, text_key, role_names):
    """(roles, texts) of a list of role/text objects."""
    roles, texts = [], []
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(MALFORMED, f"{list_key}[{j}] is not an object")
        role, text = message.get(role_key), message.get(text_key)
        if not (isinstance(text, str) and isinstance(role, str) and role in role_names):
            raise BadRecord(MALFORMED, _message_problem(message, f"{list_key}[{j}]", role_key, text_key, role_names))
        roles.append(role_names[role])
        texts.append(text)
    return roles, texts


def _message_problem(message, where, role_key, text_key, role_names):
    """What is wrong with one role/text object (only worded when something is)."""
    for key in (role_key, text_key):
        if key not in message:
            return f"{where} has no '{key}'"
        if not isinstance(message[key], str):
            return f"{where}.{key} must be a string, found {type(message[key]).__name__}"
    return f"{where}.{role_key} {message[role_key]!r} is not a role (expected {', '.join(role_names)})"


def _sharegpt(record):
    roles, texts = _turns_of(_list(record, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    return roles, texts, _system(record)


def _messages(record):
    roles, texts = _turns_of(_list(record, "messages"), "messages", "role", "content", MESSAGES_ROLES)
    return roles, texts, ""


def _alpaca(record):
    for key in ("instruction", "output"):
        if key not in record:
            raise BadRecord(MALFORMED, f"no '{key}'")
    instruction = _string(record["instruction"], "'instruction'")
    extra = _string(record.get("input") or "", "'input'")
    history = record.get("history") or []
    if not isinstance(history, list):
        raise BadRecord(MALFORMED, "'history' must be a list of [question, answer] pairs")
    texts = []
    for j, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadRecord(MALFORMED, f"history[{j}] is not a [question, answer] pair")
        texts += [_string(pair[0], f"history[{j}][0]"), _string(pair[1], f"history[{j}][1]")]
    texts += [f"{instruction}\n{extra}" if extra else instruction, _string(record["output"], "'output'")]
    return ["user", "assistant"] * (len(texts) // 2), texts, _system(record)


LAYOUTS = {"belle": _sharegpt, "sharegpt": _sharegpt, "alpaca": _alpaca, "messages": _messages}


def to_turns(record, data_format):
    """The alternating turns of one record in `data_format`; BadRecord says why there are none."""
    if isinstance(record, _InvalidLine):
        raise BadRecord(MALFORMED, record.problem)
    if not isinstance(record, dict):
        raise BadRecord(MALFORMED, f"expected an object, found a {type(record).__name__}")
    roles, texts, system = LAYOUTS[data_format](record)
    if roles and roles[0] == "system":  # a leading system turn is the system prompt
        if system:
            raise BadRecord(MALFORMED, "a 'system' key and a system turn")
        system, roles, texts = texts[0], roles[1:], texts[1:]
    if "assistant" not in roles:
        raise BadRecord(NO_ASSISTANT, "no assistant turn")
    for j, role in enumerate(roles):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            raise BadRecord(BAD_ORDER, f"turn {j} is {role}, expected {expected} (turns alternate, user first)")
    if roles[-1] != "assistant":
        raise BadRecord(BAD_ORDER, "the last turn is a user turn with no answer")
    for j, text in enumerate(texts):
        if not text.strip():
            raise BadRecord(EMPTY_TURN, f"turn {j} ({roles[j]}) is empty")
    if system:
        texts[0] = f"{system}\n{texts[0]}"
    return texts


@dataclass
class Drop:
    """A record left out (on_bad_record "skip"): where it is, which of DROP_REASONS and the detail."""
    file: str
    index: int
    reason: str
    problem: str
    source: int

    def as_dict(self):
        return {"file": self.file, "index": self.index, "reason": self.reason, "problem": self.problem}


def load_conversations(sources, on_bad_record="fail"):
    """(conversations, drops, files) of every source, in source order and each glob's sorted file order.

    A bad record fails the run, naming file and index, or with on_bad_record="skip" becomes a Drop.
    `files` lists {"file", "format", "records", "source"} per file read.
    """
    conversations, drops, files = [], [], []
    for s, source in enumerate(sources):
        paths = input_files([source.path])
        if not paths:
            raise InputError(f"{source.path}: no file matches")
        for path in paths:
            records = read_records(path)
            if source.format != "auto":
                data_format = source.format
            else:  # (an empty file has no format, and nothing to read with one)
                data_format = detect_format(path, records) if records else None
            files.append({"file": str(path), "format": data_format, "records": len(records), "source": s})
            for index, record in enumerate(records):
                try:
                    turns = to_turns(record, data_format)
                except BadRecord as bad:
                    if on_bad_record != "skip":
                        raise InputError(f"{path}: record {index} ({data_format} format): {bad}") from None
                    drops.append(Drop(str(path), index, bad.reason, str(bad), s))
                    continue
                # the record's id, or its position among the usable records (the recipe's split key)
                key = record.get("id", len(conversations))
                conversations.append(Conversation(turns, key, s, str(path), index))
    return conversations, drops, files


def conversation_texts(train):
    """Every turn text of the usable conversations of a data.train value (tokenizer training input).
    Bad records are the mindrecord step's to report; here they are left out."""
    conversations, _, _ = load_conversations(parse_sources(train), on_bad_record="skip")
    if not conversations:
        raise InputError(f"{train}: no conversations to train a tokenizer on")
    return [text for c in conversations for text in c.turns]


def has_control_text(conversation):
    return any(t in text for text in conversation.turns for t in CONTROL_TEXTS)


def is_heldout(record_id, fraction, seed):
    """Whether a conversation belongs to the held-out split.

    Decided by a hash of (seed, id), not by position: adding, removing or reordering other records
    never moves a conversation between train and held-out.
    """
    digest = hashlib.sha256(f"{seed}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


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
        """Token ids of each text, without BOS/EOS. sentencepiece encodes `</s>` in a text as the
        characters `<`, `/`, `s`, `>`, never as the eos id; the role markers, which it would match, are
        encoded as their characters too (_with_markers_as_text): data cannot inject control tokens."""
        texts = list(texts)
        ids = self.sp.encode(texts, num_threads=num_threads or os.cpu_count() or 1)
        for i, text in enumerate(texts):
            if USER_PIECE in text or ASSISTANT_PIECE in text:
                ids[i] = self._with_markers_as_text(text)
        return ids

    def _with_markers_as_text(self, text):
        """A marker's `<` and the rest are encoded apart, so that no piece spans them; the text around
        it is encoded as it would be on its own."""
        ids = []
        for part in ROLE_MARKER.split(text):
            if part in (USER_PIECE, ASSISTANT_PIECE):
                ids += self.sp.encode(part[:1]) + self.sp.encode(part[1:])
            elif part:
                ids += self.sp.encode(part)
        return ids


def _starts(counts):
    """Where each of consecutive runs of `counts` elements starts (an exclusive cumulative sum)."""
    starts = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return starts


class TokenizedConversations:
    """The token ids of every turn of a list of conversations, flat in numpy arrays:
    turn t's ids are ids[turn_start[t]:turn_start[t] + turn_length[t]]; conversation c's turns are
    first_turn[c] .. first_turn[c] + turn_count[c] - 1; length[c] is its untruncated row length."""

    ENCODE_BATCH = 65536  # texts per sentencepiece call: python lists of ids stay small

    def __init__(self, conversations, tok):
        self.turn_count = np.fromiter((len(c.turns) for c in conversations), np.int64, len(conversations))
        self.first_turn = _starts(self.turn_count)
        texts = [text for c in conversations for text in c.turns]
        ids, lengths = [], []
        for start in range(0, len(texts), self.ENCODE_BATCH):
            batch = tok.encode(texts[start:start + self.ENCODE_BATCH])
            length = np.fromiter(map(len, batch), np.int64, len(batch))
            ids.append(np.fromiter(chain.from_iterable(batch), np.int32, int(length.sum())))
            lengths.append(length)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        self.turn_length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.turn_start = _starts(self.turn_length)
        # every turn adds a marker to its ids; the row ends with eos
        per_conversation = np.add.reduceat(self.turn_length, self.first_turn) if len(conversations) else 0
        self.length = per_conversation + self.turn_count + 1


def assemble_rows(tokens, chosen, tok, seq_length):
    """(input_ids, labels): int32 arrays of shape [len(chosen), seq_length + 1], row i the recipe's row
    of conversation chosen[i]. Vectorised: every marker, id and final eos of every chosen conversation
    is given its (row, column) at once, and those that fall inside the row width are written."""
    width = seq_length + 1
    rows = len(chosen)
    input_ids = np.full((rows, width), PAD_ID, np.int32)
    labels = np.full((rows, width), IGNORE_TOKEN_ID, np.int32)

    def put(row, column, input_value, label_value):
        inside = column < width
        input_ids[row[inside], column[inside]] = np.broadcast_to(input_value, row.shape)[inside]
        labels[row[inside], column[inside]] = np.broadcast_to(label_value, row.shape)[inside]

    # the turns of the chosen conversations: their row, their place in the conversation, their ids
    count = tokens.turn_count[chosen]
    row_of_turn = np.repeat(np.arange(rows), count)
    nth = np.arange(count.sum()) - np.repeat(_starts(count), count)
    turn = tokens.first_turn[chosen][row_of_turn] + nth
    is_user = nth % 2 == 0  # turns alternate, user first
    size = tokens.turn_length[turn]
    # a turn takes 1 + size columns (marker, ids) after the turns before it in its row
    taken = _starts(size + 1)
    marker_column = taken - taken[_starts(count)][row_of_turn]
    put(row_of_turn, marker_column, np.where(is_user, tok.user, tok.assistant),
        np.where(is_user, tok.eos, IGNORE_TOKEN_ID))
    # each id sits k columns after its turn's marker + 1; user ids are masked in the labels
    k = np.arange(size.sum()) - np.repeat(_starts(size), size)
    ids = tokens.ids[np.repeat(tokens.turn_start[turn], size) + k]
    put(np.repeat(row_of_turn, size), np.repeat(marker_column + 1, size) + k, ids,
        np.where(np.repeat(is_user, size), IGNORE_TOKEN_ID, ids))
    put(np.arange(rows), tokens.length[chosen] - 1, tok.eos, tok.eos)
    return input_ids, labels


# -- writing ----------------------------------------------------------------------------------------

class MindRecordWriter:
    """A MindRecord file (+ `.db`) of SCHEMA rows, written a batch of equal-length rows at a time.

    MindSpore's FileWriter creates the file, its header and, at commit, the `.db` index. The rows go to
    the C++ shard writer that FileWriter.write_raw_data ends in, as the very blobs it would build, but a
    batch is serialised at once with numpy: FileWriter checks and serialises each row in Python, which
    costs more than all the rest of preprocessing (benchmarks/README.md). The file is byte-identical to
    FileWriter's (tests/test_data.py checks it); the private attributes used are MindSpore 2.9's.
    """

    def __init__(self, path, description="belle_baichuan2"):
        from mindspore.mindrecord import FileWriter

        self.file = FileWriter(str(path), shard_num=1, overwrite=True)
        self.file.add_schema(SCHEMA, description)
        # what FileWriter.write_raw_data does before its first rows
        self.file._writer.open(self.file._paths, True)
        self.file._writer.set_shard_header(self.file._header)
        self.blob_fields = self.file._header.blob_fields  # their order in a row's blob

    def write(self, input_ids, labels):
        """Append rows: input_ids and labels are int32 arrays [rows, width]."""
        columns = {"input_ids": input_ids, "labels": labels}
        parts = []
        for field in self.blob_fields:
            column = np.ascontiguousarray(columns[field])
            if column.dtype != np.int32 or column.ndim != 2:
                raise ValueError(f"{field}: expected int32 rows [rows, width], got {column.dtype} {column.shape}")
            # a row's blob, as FileWriter builds it: per field its byte length (8 bytes big-endian), its bytes
            parts += [np.full((len(column), 1), column.shape[1] * 4, ">u8").view(np.uint8), column.view(np.uint8)]
        if len(input_ids):
            blobs = np.concatenate(parts, axis=1)
            self.file._writer._writer.write_raw_data({}, [row.tobytes() for row in blobs], False, False)

    def commit(self):
        self.file.commit()


def write_mindrecord(path, rows, description="belle_baichuan2"):
    """Write (input_ids, labels, ...) rows of one length to `path` (+ `path`.db)."""
    writer = MindRecordWriter(path, description)
    rows = list(rows)
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        chunk = rows[start:start + ROWS_PER_CHUNK]
        writer.write(np.stack([r[0] for r in chunk]), np.stack([r[1] for r in chunk]))
    writer.commit()


def write_split(path, tokens, chosen, tok, seq_length):
    """Write the rows of conversations `chosen` (in order) to `path`; returns the label-token count."""
    writer = MindRecordWriter(path)
    label_tokens = 0
    for start in range(0, len(chosen), ROWS_PER_CHUNK):
        input_ids, labels = assemble_rows(tokens, chosen[start:start + ROWS_PER_CHUNK], tok, seq_length)
        label_tokens += int((labels != IGNORE_TOKEN_ID).sum())
        writer.write(input_ids, labels)
    writer.commit()
    return label_tokens


# -- splits, weights, stats --------------------------------------------------------------------------

def weighted_rows(train, source_of, sources, seed):
    """The training rows (conversation indices, in order): each source's rows, as many whole times as
    the integer part of its weight, then a sample of the fraction of them (a weight of 1.5 gives every
    conversation once and a random half again), drawn without replacement by a generator seeded with
    (seed, source index) and kept in file order. Training shuffles the rows; this only sets the mix."""
    parts = []
    for s, source in enumerate(sources):
        mine = train[source_of[train] == s]
        whole, fraction = divmod(source.weight, 1)
        parts += [mine] * int(whole)
        extra = round(fraction * len(mine))
        if extra:
            rng = np.random.default_rng([seed, s])
            parts.append(np.sort(rng.choice(mine, extra, replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def row_stats(lengths, label_tokens, seq_length):
    """Counts for one split: samples, kept tokens, label tokens, truncation, length histogram."""
    truncated = int((lengths > seq_length + 1).sum())
    edges = np.unique(np.linspace(0, max(int(lengths.max()), seq_length + 1), 11).astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    return {
        "samples": len(lengths),
        "tokens": int(np.minimum(lengths, seq_length + 1).sum()),
        "label_tokens": label_tokens,
        "truncated": truncated,
        "truncated_ratio": round(truncated / len(lengths), 4),
        "length_max": int(lengths.max()),
        "length_mean": round(float(lengths.mean()), 1),
        "length_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def _reasons(drops):
    counts = {reason: 0 for reason in DROP_REASONS}
    for drop in drops:
        counts[drop.reason] += 1
    return counts


def _why_nothing_is_left(where, drops, seq_length):
    """One line: the data has no records, or how many were dropped for which reason."""
    if not drops:
        return f"{where}: no conversations to train on (no records)"
    counts = _reasons(drops)
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts.items() if n)
    longer = f"; over length: longer than seq_length + 1 = {seq_length + 1} tokens" if counts[OVER_LENGTH] else ""
    return f"{where}: no conversations to train on: all {len(drops)} records dropped ({reasons}){longer}"


def summary(stats):
    dropped = ", ".join(f"{reason} {n}" for reason, n in stats["drop_reasons"].items() if n)
    lines = [f"data: {stats['input']} -> rows of {stats['seq_length'] + 1} tokens, "
             f"{stats['skipped']} records dropped" + (f" ({dropped})" if dropped else "")]
    for split in ("train", "heldout"):
        s = stats.get(split)
        if s:
            lines.append(f"  {split:8} {s['samples']:7d} samples {s['tokens']:10d} tokens "
                         f"{s['label_tokens']:9d} label tokens, truncated {s['truncated']} "
                         f"({100 * s['truncated_ratio']:.1f}%), length mean {s['length_mean']} max {s['length_max']}")
    for source in stats["sources"]:
        lines.append(f"  source {source['path']} (weight {source['weight']:g}): {source['records']} records, "
                     f"{source['dropped']} dropped, {source['train_rows']} train rows"
                     + (f", {source['heldout_rows']} held-out rows" if "heldout_rows" in source else ""))
    if stats["control_text_records"]:
        lines.append(f"  {stats['control_text_records']} records contain the text {', '.join(CONTROL_TEXTS)}: "
                     f"encoded as text, not control tokens (MindFormers r1.0 made them control ids, so its rows "
                     f"differ there)")
    return "\n".join(lines)


def preprocess_conversations(train, model_file, output_file, seq_length, heldout_file=None,
                             heldout_fraction=0.0, split_seed=0, on_bad_record="fail", stats_file=None,
                             run=None, data_format="auto", sample_seed=0):
    """Chat data -> `output_file` MindRecord (+ .db), optionally a held-out MindRecord and stats JSON.

    `train` is a data.train value: a path or glob, or a list of sources {path, format, weight}
    (`data_format` is the format of those that name none). All outputs appear together, or none do.
    """
    if seq_length < 1:
        raise InputError(f"seq_length must be positive, got {seq_length}")
    sources = parse_sources(train, data_format)
    where = ", ".join(s.path for s in sources)
    tok = ChatTokenizer(model_file)
    conversations, drops, files = load_conversations(sources, on_bad_record)
    tokens = TokenizedConversations(conversations, tok)
    usable = np.ones(len(conversations), bool)
    if on_bad_record == "skip":  # otherwise truncated, as the recipe does
        usable = tokens.length <= seq_length + 1
        for c in np.flatnonzero(~usable):
            bad = conversations[c]
            drops.append(Drop(bad.file, bad.index, OVER_LENGTH,
                              f"{tokens.length[c]} tokens, longer than seq_length + 1 = {seq_length + 1}", bad.source))
    for drop in drops[:LOGGED_DROPS]:
        log.warning("dropped %s record %d: %s: %s", drop.file, drop.index, drop.reason, drop.problem)
    if not usable.any():
        raise InputError(_why_nothing_is_left(where, drops, seq_length))

    source_of = np.fromiter((c.source for c in conversations), np.int64, len(conversations))
    kept = np.flatnonzero(usable)
    heldout = np.array([is_heldout(conversations[c].key, heldout_fraction, split_seed) for c in kept], bool) \
        if heldout_file else np.zeros(len(kept), bool)
    splits = {"train": weighted_rows(kept[~heldout], source_of, sources, sample_seed)}
    if heldout_file:
        splits["heldout"] = kept[heldout]
    for split, rows in splits.items():
        if not len(rows):
            raise InputError(f"{where}: data.heldout_fraction {heldout_fraction}"
                             + (" and the source weights leave" if split == "train" else " leaves")
                             + f" no {split} rows from {len(kept)} conversations")

    control = np.fromiter((has_control_text(c) for c in conversations), bool, len(conversations)) & usable
    stats = {"input": where, "seq_length": seq_length, "skipped": len(drops), "drop_reasons": _reasons(drops),
             "skipped_records": [d.as_dict() for d in drops[:LISTED_DROPS]],
             "control_text_records": int(control.sum()),
             "sample_seed": sample_seed if draws_samples(sources) else None,
             "sources": _source_stats(sources, files, drops, source_of, control, splits)}
    outputs = {"train": Path(output_file), "heldout": Path(heldout_file) if heldout_file else None}
    finals = [p for split in splits for p in (outputs[split], Path(f"{outputs[split]}.db"))]
    finals += [Path(stats_file)] if stats_file else []
    # two int32 columns of seq_length + 1 per row, plus MindRecord's page and index overhead (~20%)
    need = int(sum(len(rows) for rows in splits.values()) * (seq_length + 1) * 8 * 1.2)
    with atomic_outputs(finals, run=run, inputs=[*input_files(sources), model_file], need_bytes=need) as temps:
        temp_of = dict(zip(finals, temps))
        for split, rows in splits.items():
            label_tokens = write_split(temp_of[outputs[split]], tokens, rows, tok, seq_length)
            stats[split] = row_stats(tokens.length[rows], label_tokens, seq_length)
            log.info("wrote %d %s rows", len(rows), split)
        if stats_file:
            temp_of[Path(stats_file)].write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
    log.info("%s", summary(stats))
    return stats


# The recipe step's name (scripts/belle_preprocess.py); callers that predate other formats use it.
preprocess_belle = preprocess_conversations


def _source_stats(sources, files, drops, source_of, control, splits):
    """Per source: its files and their formats, records read, dropped, and rows in each split."""
    stats = []
    for s, source in enumerate(sources):
        mine = [f for f in files if f["source"] == s]
        stats.append({
            "path": source.path, "weight": source.weight,
            "files": [{k: f[k] for k in ("file", "format", "records")} for f in mine],
            "records": sum(f["records"] for f in mine),
            "dropped": sum(d.source == s for d in drops),
            "control_text_records": int(control[source_of == s].sum()),
            **{f"{split}_rows": int((source_of[rows] == s).sum()) for split, rows in splits.items()},
        })
    return stats
