"""Chat data -> MindRecord rows, as MindFormers r1.0's belle_preprocess.py builds them, in bounded memory.

Input: JSON or JSON Lines files in one of four layouts (FORMATS), detected per file or named:
  belle, sharegpt  {"conversations": [{"from", "value"}...], optional "system"}: one layout under the two
                   names users know it by
  alpaca           {"instruction", "input", "output", optional "history": [[q, a]...], optional "system"};
                   the user turn is instruction, plus "\\n" + input when input is not empty
  messages         {"messages": [{"role": "system"|"user"|"assistant", "content"}...]} (OpenAI)

Turns. A record becomes a list of turns, each a user or an assistant turn, in the record's order; the
row is built from each turn's own role, whatever the order (nothing assumes that turns alternate).
In the BELLE layout `from` is read as r1.0 reads it, "human" a user turn and anything else an assistant
turn ("gpt", "assistant", and names r1.0 did not know either: kind "unknown role"), with two exceptions,
both for roles whose r1.0 row would train the model to say what it must not:
  "user"    a user turn (kind "user role"). ShareGPT- and OpenAI-style files name the user so; r1.0 made
            it an assistant turn, training the model on the user's words with no user turn in the row.
  "system"  and a "system" key: system text (kind "system prompt"). r1.0 ignored the key and made the
            turn an assistant turn, training the model to produce the system prompt.
In the messages layout a role other than user/assistant/system is malformed.
System text: Baichuan2's template has no system token, so the "system" key, then each system turn, is
joined with "\\n" in front of the text of the next turn when that is a user turn, and is otherwise a user
turn of its own (the text is context, never a target). An empty system text adds nothing.

Row layout (seq_length N gives rows of N + 1 tokens; the model shifts them by one), r1.0's:
  user turn:      input += [user] + ids,       labels += [eos] + [-100] * len(ids)
  assistant turn: input += [assistant] + ids,  labels += [-100] + ids
  then input += [eos], labels += [eos]; truncate to N + 1; pad input with 0 and labels with -100.
user/assistant are the ids of `<reserved_106>`/`<reserved_107>` looked up in the tokenizer. No turns at
all (an empty `conversations` list) gives r1.0's eos-only row.

Literal `</s>`, `<s>`, `<unk>` and the role markers in the text are encoded as text, never as control or
marker ids (docs/data.md, "Control tokens in the text are text"); records containing them are counted.

Kinds of record (docs/data.md, "Which rule applies to which record"):
  malformed     what r1.0 crashes on or cannot read: not an object, no `conversations` list, a turn that
                is not an object or lacks from/value, a value that is not a string, a JSON Lines line
                that is not JSON (and the same for the other layouts). It fails the run naming file and
                index, or with on_bad_record "skip" is dropped.
  questionable  (KINDS) r1.0 trains on it as it is: an empty conversation, no assistant turn, a bad role
                order (an assistant turn first, or one role twice in a row), a trailing user turn, an
                empty or whitespace-only turn, and the role rules above. Its row is built by the rules
                above, it is counted in the stats, the first few are logged with file and index, and it
                is dropped only when data.drop names one of its kinds.
  over length   longer than a row: truncated, as r1.0 does, or dropped when data.drop names "over length".

Memory. Nothing per record outlives its batch: files are read a record at a time (JSON Lines a line at a
time; a JSON array by json's scanner over a sliding 1 MiB window, iter_records), and conversations are
tokenized, assembled and written ROWS_PER_CHUNK at a time. The input is read twice: a first pass counts
what must be known before the first row is written (rows per source and split: the sample of a
fractional weight draws over a source's whole count, the disk-space check, an empty split's error) and a
second writes; a weight of 2 or more reads its source once per copy. What is kept in between is a few
numbers per source and the sampled positions (8 bytes per sampled conversation); length statistics are
counts per length. The MindRecord's .db index is written a row at a time as well (write_index: MindSpore's
own index generator holds ~1.4 KB per row). benchmarks/README.md: flat peak RSS up to 1.6 million
conversations.
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
from lorapipe.model.architecture import ASSISTANT_PIECE, USER_PIECE
from lorapipe.model.tokenizer import ChatTokenizer

log = logging.getLogger("lorapipe")

IGNORE_TOKEN_ID = -100
PAD_ID = 0
SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
# Packed rows (data.packing) carry each token's conversation: 1, 2, ... in the row, 0 for padding.
PACKED_SCHEMA = {**SCHEMA, "segment_ids": {"type": "int32", "shape": [-1]}}
FORMATS = ("belle", "sharegpt", "alpaca", "messages")
CONTROL_TEXTS = ("</s>", "<s>", "<unk>", USER_PIECE, ASSISTANT_PIECE)
MALFORMED = "malformed"
EMPTY_CONVERSATION, NO_ASSISTANT, BAD_ORDER, TRAILING_USER, EMPTY_TURN, UNKNOWN_ROLE, USER_ROLE, SYSTEM_PROMPT = (
    "empty conversation", "no assistant turn", "bad role order", "trailing user turn", "empty turn",
    "unknown role", "user role", "system prompt")
KINDS = (EMPTY_CONVERSATION, NO_ASSISTANT, BAD_ORDER, TRAILING_USER, EMPTY_TURN, UNKNOWN_ROLE, USER_ROLE,
         SYSTEM_PROMPT)  # questionable records; a record's drop reason is the first of its kinds data.drop names
OVER_LENGTH = "over length"
DROPPABLE = (*KINDS, OVER_LENGTH)  # what data.drop may name
DROP_REASONS = (MALFORMED, *DROPPABLE)
LOGGED = 5            # the first drops, and the first questionable records kept, are logged with file and index
LISTED = 100          # ... and this many of each are listed in the stats JSON
ROWS_PER_CHUNK = 4096  # conversations tokenized, assembled and written at a time
READ_CHUNK = 1 << 20   # bytes of a JSON file decoded at a time

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


# -- reading: one record at a time -------------------------------------------------------------------

class _InvalidLine:
    """A JSON Lines line that is not JSON: a malformed record, dropped or reported like any other."""

    def __init__(self, problem):
        self.problem = problem


def iter_records(path):
    """The records of one JSON (an array) or JSON Lines file, one at a time; one clear InputError,
    naming the file and where, for input that cannot be read.

    `.jsonl`/`.ndjson` files are JSON Lines. Any other file is a JSON array, or JSON Lines when it holds
    more than one value (JSON Lines named `.json`). A JSON Lines line that is not JSON is a malformed
    record (_InvalidLine); an array that is not JSON fails the file. A UTF-8 byte order mark is ignored.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    with f:
        if path.suffix in (".jsonl", ".ndjson"):
            yield from _json_lines(path, f)
            return
        text = _ChunkedText(path, f)
        if not _skip_space(text):
            raise text.invalid("Expecting value", text.pos)  # an empty file, as json.loads says
        if text.text[text.pos] == "[":
            yield from _json_array(text)
            return
        first = _decode(text)
        if _skip_space(text):  # a second value: JSON Lines under another name
            f.seek(0)
            yield from _json_lines(path, f)
            return
        raise InputError(f"{path}: expected a JSON array of conversations (or JSON Lines), "
                         f"found a {type(first).__name__}")


def _utf8_error(path, error, data, offset, lines):
    """The InputError for bytes that are not UTF-8: `error` from decoding `data`, which starts at byte
    `offset` of the file after `lines` newlines."""
    line = lines + data.count(b"\n", 0, error.start) + 1
    return InputError(f"{path}: line {line} (byte {offset + error.start}): bytes that are not UTF-8 "
                      f"({data[error.start:error.start + 4]!r}); chat data must be UTF-8")


def _json_lines(path, f):
    """The records of a JSON Lines file, a line at a time (lines end at "\\n" only: a U+2028 inside a
    string is part of it)."""
    offset = number = 0
    for raw in f:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(path, e, raw, offset, number) from None
        offset += len(raw)
        number += 1
        if number == 1 and line.startswith("\ufeff"):
            line = line[1:]
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield _InvalidLine(f"line {number} is not JSON ({e.msg} at column {e.colno})")


def _char_boundary(data):
    """len(data), less the bytes of a UTF-8 character that goes on past its end."""
    end = len(data)
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte < 0x80:
            return end
        if byte >= 0xC0:  # a character's first byte: 2, 3 or 4 bytes in all
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return end - back if need > back else end
    return end  # not UTF-8: the decoder says where


class _ChunkedText:
    """A UTF-8 file as text, decoded a chunk at a time: `text[pos:]` is what is not consumed yet.
    read() drops the consumed text and appends at least as much again as is left (a record larger
    than a chunk is read in doubling steps, so parsing it again after each costs at most twice its
    size). Lines and columns of consumed text are counted for error messages."""

    def __init__(self, path, f):
        self.path, self.f = path, f
        self.text, self.pos = "", 0
        self.eof = False
        self._pending = b""   # the bytes of a character cut by the chunk's end
        self._offset = 0      # bytes decoded before them
        self._byte_lines = 0  # newlines in those bytes
        self._lines = 0       # newlines in the text dropped before self.text
        self._column = 0      # characters after the last of them

    def read(self):
        """Append the next chunk; False when the file has no more (and then nothing moves)."""
        if self.eof:
            return False
        new = self.f.read(max(READ_CHUNK, len(self.text) - self.pos))
        if not new:
            self.eof = True
            if self._pending:  # a character cut short by the end of the file
                try:
                    self._pending.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _utf8_error(self.path, e, self._pending, self._offset, self._byte_lines) from None
            return False
        if self.pos:
            newlines = self.text.count("\n", 0, self.pos)
            if newlines:
                self._lines += newlines
                self._column = self.pos - self.text.rfind("\n", 0, self.pos) - 1
            else:
                self._column += self.pos
            self.text, self.pos = self.text[self.pos:], 0
        data = self._pending + new
        end = _char_boundary(data)
        try:
            chunk = data[:end].decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(self.path, e, data, self._offset, self._byte_lines) from None
        if self._offset == 0 and chunk.startswith("\ufeff"):
            chunk = chunk[1:]
        self._byte_lines += data.count(b"\n", 0, end)
        self._offset += end
        self._pending = data[end:]
        self.text += chunk
        return True

    def invalid(self, message, pos):
        """The InputError for invalid JSON at text[pos], with json's line and column."""
        newlines = self.text.count("\n", 0, pos)
        line = self._lines + newlines + 1
        column = pos - self.text.rfind("\n", 0, pos) if newlines else self._column + pos + 1
        return InputError(f"{self.path}: invalid JSON at line {line} column {column}: {message}")


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_COMMA = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")
_DECODER = json.JSONDecoder()


def _skip_space(text):
    """Move past whitespace; False when the file ends first."""
    while True:
        text.pos = _SPACE.match(text.text, text.pos).end()
        if text.pos < len(text.text):
            return True
        if not text.read():
            return False


def _decode(text):
    """The JSON value at text.pos, read on until it is whole (json's C scanner does the parsing)."""
    while True:
        try:
            value, end = _DECODER.raw_decode(text.text, text.pos)
        except json.JSONDecodeError as e:
            # An error at the window's end (the last few characters: a cut literal or escape) or an
            # unterminated string may be the window's, not the file's: read on and try again.
            if (e.pos >= len(text.text) - 16 or e.msg.startswith("Unterminated string")) and text.read():
                continue
            raise text.invalid(e.msg, e.pos) from None
        if (end == len(text.text) or type(value) in (int, float) and _NUMBER_TAIL.fullmatch(text.text, end)) \
                and text.read():  # a number may go on past the window: "1" of "1.5", "1E+2"
            continue
        text.pos = end
        return value


def _json_array(text):
    """The elements of the JSON array that starts at text.pos, one at a time."""
    text.pos += 1
    if not _skip_space(text):
        raise text.invalid("Expecting value", text.pos)
    if text.text[text.pos] == "]":
        text.pos += 1
    else:
        while True:
            yield _decode(text)
            comma = _COMMA.match(text.text, text.pos)
            if comma and comma.end() < len(text.text):  # (else the window may end inside the space)
                text.pos = comma.end()
                continue
            if not _skip_space(text):
                raise text.invalid("Expecting ',' delimiter", text.pos)
            if text.text[text.pos] == "]":
                text.pos += 1
                break
            if text.text[text.pos] != ",":
                raise text.invalid("Expecting ',' delimiter", text.pos)
            text.pos += 1
            if not _skip_space(text):
                raise text.invalid("Expecting value", text.pos)
    if _skip_space(text):
        raise text.invalid("more data after the JSON array (JSON Lines has one record per line)", text.pos)


def detect_format(path):
    """The layout of a file, from its first record that has one of the layouts' keys (read up to
    there); None for a file without records."""
    seen = False
    for record in iter_records(path):
        seen = True
        if isinstance(record, dict):
            for key, data_format in (("conversations", "belle"), ("messages", "messages"),
                                     ("instruction", "alpaca")):
                if key in record:
                    return data_format
    if not seen:
        return None
    raise InputError(f"{path}: cannot tell the format: no record has a 'conversations', 'messages' or "
                     f"'instruction' key; set data.format to one of {', '.join(FORMATS)}")


# -- records -> conversations -------------------------------------------------------------------------

@dataclass(slots=True)
class Conversation:
    """One readable record: its turns (is_user[t], texts[t], system text already placed), the kinds of
    questionable record it is ({kind: detail} in KINDS order), `key` for the held-out split, and where
    it is (`file`, `index`)."""
    is_user: list
    texts: list
    kinds: dict
    key: object
    file: str
    index: int


class BadRecord(Exception):
    """Why a record is malformed: `reason` (MALFORMED) and the detail."""

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
    if not isinstance(value, list):
        raise BadRecord(MALFORMED, f"'{key}' must be a list, found {type(value).__name__}")
    return value


def _system(record):
    return _string(record.get("system") or "", "'system'")


# The BELLE layout's role names: r1.0 reads "human" as the user and anything else as the assistant.
BELLE_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGES_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
_BELLE_IS_USER = {"human": True, "gpt": False, "assistant": False}  # the roles r1.0's BELLE data has
_ALTERNATING = [True, False] * 256


def _belle(record, kinds):
    roles, texts = [], []
    for j, message in enumerate(_list(record, "conversations")):
        if not isinstance(message, dict):
            raise BadRecord(MALFORMED, f"conversations[{j}] is not an object")
        for key in ("from", "value"):
            if key not in message:
                raise BadRecord(MALFORMED, f"conversations[{j}] has no '{key}'")
        role, text = message["from"], _string(message["value"], f"conversations[{j}].value")
        name = BELLE_ROLES.get(role, "assistant") if isinstance(role, str) else "assistant"
        if name == "assistant" and role not in ("gpt", "assistant") and UNKNOWN_ROLE not in kinds:
            kinds[UNKNOWN_ROLE] = f"conversations[{j}].from {role!r} is an assistant turn, as r1.0 reads it"
        elif role == "user" and USER_ROLE not in kinds:
            kinds[USER_ROLE] = f"conversations[{j}].from 'user' is a user turn (r1.0: an assistant turn)"
        elif role == "system" and SYSTEM_PROMPT not in kinds:
            kinds[SYSTEM_PROMPT] = f"conversations[{j}] is system text (r1.0: an assistant turn)"
        roles.append(name)
        texts.append(text)
    system = _system(record)
    if system and SYSTEM_PROMPT not in kinds:
        kinds[SYSTEM_PROMPT] = "a 'system' key, system text (r1.0 ignored it)"
    return roles, texts, system


def _messages(record, kinds):
    roles, texts = [], []
    for j, message in enumerate(_list(record, "messages")):
        if not isinstance(message, dict):
            raise BadRecord(MALFORMED, f"messages[{j}] is not an object")
        for key in ("role", "content"):
            if key not in message:
                raise BadRecord(MALFORMED, f"messages[{j}] has no '{key}'")
            if not isinstance(message[key], str):
                raise BadRecord(MALFORMED, f"messages[{j}].{key} must be a string, "
                                           f"found {type(message[key]).__name__}")
        if message["role"] not in MESSAGES_ROLES:
            raise BadRecord(MALFORMED, f"messages[{j}].role {message['role']!r} is not a role "
                                       f"(expected {', '.join(MESSAGES_ROLES)})")
        roles.append(message["role"])
        texts.append(message["content"])
    return roles, texts, ""


def _alpaca(record, kinds):
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


LAYOUTS = {"belle": _belle, "sharegpt": _belle, "alpaca": _alpaca, "messages": _messages}


def _place_system(roles, texts, system):
    """(is_user, texts) of the turns: system text (the key, then each system turn) joined with "\\n" in
    front of the next turn's text when that is a user turn, else a user turn of its own."""
    if not system and "system" not in roles:
        return [role == "user" for role in roles], texts
    pending = [system] if system else []
    is_user, out = [], []
    for role, text in zip(roles, texts):
        if role == "system":
            if text:
                pending.append(text)
            continue
        if pending:
            if role == "user":
                text = "\n".join([*pending, text])
            else:
                is_user.append(True)
                out.append("\n".join(pending))
            pending = []
        is_user.append(role == "user")
        out.append(text)
    if pending:
        is_user.append(True)
        out.append("\n".join(pending))
    return is_user, out


def _questionable(is_user, texts, kinds):
    """Add the kinds the turns make the record (KINDS; {kind: detail}); return them in KINDS order."""
    if not is_user:
        kinds[EMPTY_CONVERSATION] = "no turns: r1.0 writes an eos-only row"
    else:
        if all(is_user):
            kinds[NO_ASSISTANT] = "no assistant turn: nothing to learn but the markers and eos"
        if not is_user[0]:
            kinds[BAD_ORDER] = "turn 0 is an assistant turn"
        else:
            for j in range(1, len(is_user)):
                if is_user[j] == is_user[j - 1]:
                    kinds[BAD_ORDER] = f"turns {j - 1} and {j} are both {'user' if is_user[j] else 'assistant'} turns"
                    break
        if is_user[-1]:
            kinds[TRAILING_USER] = f"the last turn, {len(is_user) - 1}, is a user turn with no answer"
        for j, text in enumerate(texts):
            if not text.strip():
                kinds[EMPTY_TURN] = f"turn {j} ({'user' if is_user[j] else 'assistant'}) is " + (
                    "whitespace only" if text else "empty")
                break
    return {kind: kinds[kind] for kind in KINDS if kind in kinds} if kinds else kinds


def to_turns(record, data_format):
    """(is_user, texts, kinds) of one record in `data_format`: its turns, system text placed, and the
    kinds of questionable record it is ({kind: detail}, empty for most); BadRecord when malformed."""
    if type(record) is dict and data_format in ("belle", "sharegpt") and not record.get("system"):
        # the common case, fast: human/gpt/assistant turns whose values are strings
        messages = record.get("conversations")
        if type(messages) is list:
            try:
                is_user = [_BELLE_IS_USER[m["from"]] for m in messages]
                texts = [m["value"] for m in messages]
                filled = all(map(str.strip, texts))  # (TypeError for a value that is not a string)
            except (KeyError, TypeError):
                pass
            else:
                n = len(is_user)
                if filled and n and not n % 2 and is_user == _ALTERNATING[:n]:
                    return is_user, texts, {}  # user first, alternating, assistant last: most records
                return is_user, texts, _questionable(is_user, texts, {})
    if isinstance(record, _InvalidLine):
        raise BadRecord(MALFORMED, record.problem)
    if not isinstance(record, dict):
        raise BadRecord(MALFORMED, f"expected an object, found a {type(record).__name__}")
    kinds = {}
    roles, texts, system = LAYOUTS[data_format](record, kinds)
    is_user, texts = _place_system(roles, texts, system)
    return is_user, texts, _questionable(is_user, texts, kinds)


@dataclass
class Drop:
    """A record left out: where it is, which of DROP_REASONS and the detail."""
    file: str
    index: int
    reason: str
    problem: str

    def as_dict(self):
        return {"file": self.file, "index": self.index, "reason": self.reason, "problem": self.problem}


class _Records:
    """The sources' records in order, a file at a time, as Conversations: what both passes read.

    `conversations(s, key)` yields the conversations of source s that are not dropped for what the
    record is (malformed under on_bad_record "skip", a kind data.drop names), each with its split key:
    its `id`, or its position among those conversations of all sources, counted from `key`. With a
    _Tally (the first pass) it also reports what it leaves out, and fails on a malformed record under
    on_bad_record "fail"; the second pass reads the same records again silently.
    """

    def __init__(self, sources, on_bad_record, drop):
        self.sources, self.on_bad_record, self.drop = sources, on_bad_record, set(drop)
        self.files = []
        for source in sources:
            paths = input_files([source.path])
            if not paths:
                raise InputError(f"{source.path}: no file matches")
            self.files.append(paths)
        self.formats = {}

    def format(self, s, path):
        if path not in self.formats:  # (an empty file has no format, and nothing to read with one)
            named = self.sources[s].format
            self.formats[path] = named if named != "auto" else detect_format(path)
        return self.formats[path]

    def conversations(self, s, key, tally=None):
        for path in self.files[s]:
            data_format = self.format(s, path)
            file = str(path)
            records = 0
            for index, record in enumerate(iter_records(path)):
                records += 1
                try:
                    is_user, texts, kinds = to_turns(record, data_format)
                except BadRecord as bad:
                    if tally is not None:
                        if self.on_bad_record != "skip":
                            raise InputError(f"{path}: record {index} ({data_format} format): {bad}") from None
                        tally.dropped(s, Drop(file, index, bad.reason, str(bad)))
                    continue
                if kinds:
                    reason = next((kind for kind in kinds if kind in self.drop), None)
                    if tally is not None:
                        tally.questionable(s, file, index, kinds, reason)
                    if reason:
                        continue
                yield Conversation(is_user, texts, kinds, record.get("id", key), file, index)
                key += 1
            if tally is not None:
                tally.files.append({"file": file, "format": data_format, "records": records, "source": s})


def _batches(conversations):
    """Lists of ROWS_PER_CHUNK conversations (the last may be shorter)."""
    batch = []
    for conversation in conversations:
        batch.append(conversation)
        if len(batch) == ROWS_PER_CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def conversation_texts(train):
    """The turn texts of the conversations of a data.train value (tokenizer training input): malformed
    records are the mindrecord step's to report; here they are left out, as are blank texts."""
    records = _Records(parse_sources(train), "skip", ())
    texts = [text for s in range(len(records.sources)) for c in records.conversations(s, 0)
             for text in c.texts if text.strip()]
    if not texts:
        raise InputError(f"{train}: no conversations to train a tokenizer on")
    return texts


def has_control_text(texts):
    joined = "\0".join(texts)
    return "<" in joined and any(t in joined for t in CONTROL_TEXTS)

def is_heldout(record_id, fraction, seed):
    """Whether a conversation belongs to the held-out split.

    Decided by a hash of (seed, id), not by position: adding, removing or reordering other records
    never moves a conversation between train and held-out.
    """
    digest = hashlib.sha256(f"{seed}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# -- tokens -----------------------------------------------------------------------------------------

def _starts(counts):
    """Where each of consecutive runs of `counts` elements starts (an exclusive cumulative sum)."""
    starts = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return starts


class TokenizedConversations:
    """The token ids of every turn of a batch of conversations, flat in numpy arrays:
    turn t's ids are ids[turn_start[t]:turn_start[t] + turn_length[t]] and is_user[t] its role;
    conversation c's turns are first_turn[c] .. first_turn[c] + turn_count[c] - 1; length[c] is its
    untruncated row length."""

    def __init__(self, conversations, tok):
        self.turn_count = np.fromiter((len(c.texts) for c in conversations), np.int64, len(conversations))
        self.first_turn = _starts(self.turn_count)
        turns = int(self.turn_count.sum())
        self.is_user = np.fromiter(chain.from_iterable(c.is_user for c in conversations), bool, turns)
        batch = tok.encode([text for c in conversations for text in c.texts])
        self.turn_length = np.fromiter(map(len, batch), np.int64, turns)
        self.ids = np.fromiter(chain.from_iterable(batch), np.int32, int(self.turn_length.sum()))
        self.turn_start = _starts(self.turn_length)
        # every turn adds a marker to its ids; the row ends with eos
        ends = np.concatenate([[0], np.cumsum(self.turn_length)])
        per_conversation = ends[self.first_turn + self.turn_count] - ends[self.first_turn]
        self.length = per_conversation + self.turn_count + 1


def assemble_rows(tokens, chosen, tok, seq_length):
    """(input_ids, labels): int32 arrays of shape [len(chosen), seq_length + 1], row i the recipe's row
    of conversation chosen[i]. Vectorised: every marker, id and final eos of every chosen conversation
    is given its (row, column) at once, and those that fall inside the row width are written. Each
    turn's marker and labels follow its own role."""
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
    row_first = _starts(count)
    nth = np.arange(count.sum()) - row_first[row_of_turn]
    turn = tokens.first_turn[chosen][row_of_turn] + nth
    is_user = tokens.is_user[turn]
    size = tokens.turn_length[turn]
    # a turn takes 1 + size columns (marker, ids) after the turns before it in its row
    taken = _starts(size + 1)
    marker_column = taken - np.append(taken, 0)[row_first][row_of_turn]
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
    """A MindRecord file (+ `.db`) of SCHEMA rows (PACKED_SCHEMA with segment ids), written a batch of
    equal-length rows at a time.

    MindSpore's FileWriter creates the file and its header. The rows go to the C++ shard writer that
    FileWriter.write_raw_data ends in, as the very blobs it would build, but a batch is serialised at
    once with numpy: FileWriter checks and serialises each row in Python, which costs more than all the
    rest of preprocessing (benchmarks/README.md). The file is byte-identical to FileWriter's
    (tests/test_data.py checks it); the private attributes used are MindSpore 2.9's. At commit the shard
    writer finishes the file and write_index writes the `.db` index, in place of MindSpore's index
    generator, which holds about 1.4 KB per row in memory.
    """

    def __init__(self, path, description="belle_baichuan2", schema=SCHEMA):
        from mindspore.mindrecord import FileWriter

        self.file = FileWriter(str(path), shard_num=1, overwrite=True)
        self.file.add_schema(schema, description)
        # what FileWriter.write_raw_data does before its first rows
        self.file._writer.open(self.file._paths, True)
        self.file._writer.set_shard_header(self.file._header)
        self.blob_fields = self.file._header.blob_fields  # their order in a row's blob

    def write(self, input_ids, labels, segment_ids=None):
        """Append rows: input_ids, labels (and segment_ids, for PACKED_SCHEMA) are int32 arrays [rows, width]."""
        columns = {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}
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
        self.file._flush = True  # what FileWriter.commit does, but for the index
        self.file._writer.commit()
        write_index(self.file._paths[0])


class RowPacker:
    """Packs the rows of consecutive conversations into rows of the same width, in their order (next fit):
    a conversation goes into the current packed row if it fits in what is left of it, otherwise that row is
    written and the conversation starts the next. A conversation as long as a row (truncated) fills one.

    Why in order: it streams (one packed row and a chunk of finished ones in memory, whatever the data),
    keeps the data's order (so the shuffle, the sample of a weight and the held-out split mean what they
    mean unpacked) and is deterministic. First-fit decreasing would leave less padding but needs every
    length first. benchmarks/README.md gives the padding it leaves.

    Each conversation's first label is ignored (-100): r1.0's first label is the user marker's eos, which
    the previous conversation's last position would otherwise be trained to predict. The model drops the
    first label of an unpacked row anyway (it predicts labels[t + 1] at t), so the loss of a packed row is
    the sum of its conversations' losses alone."""

    def __init__(self, writer, width):
        self.writer, self.width = writer, width
        self.rows = 0
        self._done = []      # finished packed rows (input_ids, labels, segment_ids), written in chunks
        self._new_row()

    def _new_row(self):
        self.input_ids = np.full(self.width, PAD_ID, np.int32)
        self.labels = np.full(self.width, IGNORE_TOKEN_ID, np.int32)
        self.segment_ids = np.zeros(self.width, np.int32)
        self.used = self.segments = 0

    def add(self, input_ids, labels, lengths):
        """Rows of assemble_rows and the conversations' untruncated lengths."""
        for row_ids, row_labels, n in zip(input_ids, labels, np.minimum(lengths, self.width)):
            if self.used + n > self.width:
                self._finish_row()
            at = self.used
            self.input_ids[at:at + n] = row_ids[:n]
            self.labels[at:at + n] = row_labels[:n]
            self.labels[at] = IGNORE_TOKEN_ID
            self.segments += 1
            self.segment_ids[at:at + n] = self.segments
            self.used += n
        if len(self._done) >= ROWS_PER_CHUNK:
            self._write()

    def _finish_row(self):
        self._done.append((self.input_ids, self.labels, self.segment_ids))
        self.rows += 1
        self._new_row()

    def _write(self):
        if self._done:
            self.writer.write(*(np.stack(column) for column in zip(*self._done)))
            self._done = []

    def close(self):
        if self.used:
            self._finish_row()
        self._write()


# MindSpore's ShardIndexGenerator's SQL (shard_index_generator.cc), for a schema without index fields
_INDEX_TABLE = ("CREATE TABLE INDEXES("
                "  ROW_ID               INT  NOT NULL, PAGE_ID_RAW          INT  NOT NULL"
                ", PAGE_OFFSET_RAW      INT  NOT NULL, PAGE_OFFSET_RAW_END  INT  NOT NULL"
                ", ROW_GROUP_ID         INT  NOT NULL, PAGE_ID_BLOB         INT  NOT NULL"
                ", PAGE_OFFSET_BLOB     INT  NOT NULL, PAGE_OFFSET_BLOB_END INT  NOT NULL"
                ", PRIMARY KEY(ROW_ID));")
_INDEX_ROW = ("INSERT INTO INDEXES (ROW_ID,ROW_GROUP_ID,PAGE_ID_RAW,PAGE_OFFSET_RAW,PAGE_OFFSET_RAW_END,"
              "PAGE_ID_BLOB,PAGE_OFFSET_BLOB,PAGE_OFFSET_BLOB_END) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def write_index(path):
    """Write `path`.db, the index MindDataset reads, for a finished single-shard MindRecord file whose
    schema has no index fields (SCHEMA): the tables, rows and statements of MindSpore's ShardIndexGenerator
    (its SQL dump is the same, tested; the unused bytes of the SQLite pages differ, MindSpore's SQLite
    being another build), a row at a time. MindSpore's generator builds every row of a raw-data page in
    memory first, about 1.4 KB each, and with these rows a page holds up to 2.5 million of them."""
    import sqlite3

    path = Path(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    if header.get("index_fields") or len(header["shard_addresses"]) != 1:
        raise ValueError(f"{path}: write_index writes the index of one shard without index fields")
    db_path = Path(f"{path}.db")
    if db_path.exists():
        raise FileExistsError(f"{db_path}: the index exists already")  # (as MindSpore's generator refuses)
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        # no fsync: the index is a temporary until atomic_outputs renames it (lorapipe fsyncs no output)
        db.execute("PRAGMA synchronous = OFF;")
        db.execute("DROP TABLE IF EXISTS INDEXES;")
        db.execute(_INDEX_TABLE)
        db.execute("DROP TABLE IF EXISTS SHARD_NAME;")
        db.execute("CREATE TABLE SHARD_NAME(NAME TEXT NOT NULL);")
        db.execute("INSERT INTO SHARD_NAME (NAME) VALUES (?);", (path.name,))
        db.execute("BEGIN TRANSACTION;")
        db.executemany(_INDEX_ROW, _index_rows(path, header))
        db.execute("END TRANSACTION;")
    finally:
        db.close()


def _index_rows(path, header):
    """(ROW_ID, ROW_GROUP_ID, PAGE_ID_RAW, PAGE_OFFSET_RAW, PAGE_OFFSET_RAW_END, PAGE_ID_BLOB,
    PAGE_OFFSET_BLOB, PAGE_OFFSET_BLOB_END) of every row, in the generator's order: per raw-data page, per
    row group, the rows of its blob page, each row's raw data (per schema: an 8-byte length, the bytes)
    and blob (an 8-byte length, the bytes) one after the other."""
    pages = sorted(header["page"], key=lambda page: page["page_id"])
    blob_pages = {page["page_type_id"]: page for page in pages if page["page_type"] == "BLOB_DATA"}
    schemas = len(header["schema"])
    start, page_size = header["header_size"], header["page_size"]
    fd = os.open(path, os.O_RDONLY)
    try:
        def length(page, offset):
            return int.from_bytes(os.pread(fd, 8, start + page_size * page + offset), "little")

        for raw in (page for page in pages if page["page_type"] == "RAW_DATA"):
            for group in raw["row_group_ids"]:
                blob = blob_pages[group["id"]]
                raw_at, blob_at = group["offset"], 0
                for row in range(blob["start_row_id"], blob["end_row_id"]):
                    raw_end = raw_at
                    for _ in range(schemas):
                        raw_end += 8 + length(raw["page_id"], raw_end)
                    blob_end = blob_at + 8 + length(blob["page_id"], blob_at)
                    yield row, blob["page_type_id"], raw["page_id"], raw_at, raw_end, blob["page_id"], blob_at, blob_end
                    raw_at, blob_at = raw_end, blob_end
    finally:
        os.close(fd)


def write_mindrecord(path, rows, description="belle_baichuan2"):
    """Write (input_ids, labels, ...) rows of one length to `path` (+ `path`.db)."""
    writer = MindRecordWriter(path, description)
    rows = list(rows)
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        chunk = rows[start:start + ROWS_PER_CHUNK]
        writer.write(np.stack([r[0] for r in chunk]), np.stack([r[1] for r in chunk]))
    writer.commit()


# -- counting, splits, weights, stats ------------------------------------------------------------------

class _Tally:
    """The first pass's findings: per source the records read, dropped and questionable, the
    conversations kept for each split and with control text, and where its split keys start; the drops
    and questionable records (the first LISTED of each listed, the first LOGGED logged)."""

    def __init__(self, sources):
        n = len(sources)
        self.files = []
        self.key_start = [0] * n
        self.train = [0] * n
        self.heldout = [0] * n
        self.control = [0] * n
        self.dropped_of = [0] * n
        self.questionable_of = [0] * n
        self.reasons = {reason: 0 for reason in DROP_REASONS}
        self.kinds = {kind: 0 for kind in KINDS}
        self.drops, self.long_drops, self.questionable_listed = [], [], []
        self.kept_logged = 0

    def dropped(self, s, drop, listed=None):
        self.dropped_of[s] += 1
        self.reasons[drop.reason] += 1
        if sum(self.reasons.values()) <= LOGGED:
            log.warning("dropped %s record %d: %s: %s", drop.file, drop.index, drop.reason, drop.problem)
        listed = self.drops if listed is None else listed
        if len(listed) < LISTED:
            listed.append(drop)

    def questionable(self, s, file, index, kinds, reason):
        self.questionable_of[s] += 1
        for kind in kinds:
            self.kinds[kind] += 1
        problem = "; ".join(f"{kind}: {detail}" for kind, detail in kinds.items())
        if len(self.questionable_listed) < LISTED:
            self.questionable_listed.append({"file": file, "index": index, "kinds": list(kinds),
                                             "problem": problem, "dropped": bool(reason)})
        if reason:
            self.dropped(s, Drop(file, index, reason, problem))
        elif self.kept_logged < LOGGED:
            self.kept_logged += 1
            log.warning("kept %s record %d, questionable: %s", file, index, problem)

    def split_rows(self, sources, heldout):
        """{split: rows}: the training rows per source (its whole copies and its sample), the held-out."""
        rows = {"train": [self.train[s] * int(source.weight // 1) + _sample_size(source, self.train[s])
                          for s, source in enumerate(sources)]}
        if heldout:
            rows["heldout"] = list(self.heldout)
        return rows


def _sample_size(source, count):
    """How many of a source's `count` training conversations its weight's fraction draws."""
    return round(source.weight % 1 * count)


def _sample(source, s, count, seed):
    """The sorted positions, among a source's `count` training conversations, of the sample its weight's
    fraction draws: without replacement, by a generator seeded with (seed, source index). The same draw
    as numpy's choice over the conversations themselves, so the same rows as when all were in memory."""
    size = _sample_size(source, count)
    if not size:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng([seed, s]).choice(count, size, replace=False))


class _Lengths:
    """Rows of one split as counts per untruncated length (memory: the longest length, not the rows),
    and their label tokens: what row_stats needs."""

    def __init__(self):
        self.counts = np.zeros(0, np.int64)
        self.label_tokens = 0

    def add(self, lengths, labels):
        if not len(lengths):
            return
        top = int(lengths.max()) + 1
        if top > len(self.counts):
            grown = np.zeros(max(top, 2 * len(self.counts)), np.int64)
            grown[:len(self.counts)] = self.counts
            self.counts = grown
        self.counts[:top] += np.bincount(lengths, minlength=top)
        self.label_tokens += int((labels != IGNORE_TOKEN_ID).sum())


def row_stats(lengths, seq_length):
    """Counts for one split (`lengths`: _Lengths): samples, kept tokens, label tokens, truncation, length
    histogram (edges: 11 points from 0 to the longest row or the row width; np.histogram's bins)."""
    counts, width = lengths.counts, seq_length + 1
    samples = int(counts.sum())
    length = np.arange(len(counts))
    length_max = int(length[counts > 0].max())
    truncated = int(counts[width + 1:].sum())
    edges = np.unique(np.linspace(0, max(length_max, width), 11).astype(int))
    below = np.concatenate([[0], np.cumsum(np.pad(counts, (0, max(0, edges[-1] + 1 - len(counts)))))])
    ends = np.append(edges[1:-1], edges[-1] + 1)  # the last bin holds its right edge
    histogram = below[ends] - below[edges[:-1]]
    total = int((length * counts).sum())
    return {
        "samples": samples,
        "tokens": int((np.minimum(length, width) * counts).sum()),
        "label_tokens": lengths.label_tokens,
        "truncated": truncated,
        "truncated_ratio": round(truncated / samples, 4),
        "length_max": length_max,
        "length_mean": round(total / samples, 1),
        "length_histogram": {"edges": edges.tolist(), "counts": histogram.tolist()},
    }


def _why_nothing_is_left(where, reasons, seq_length):
    """One line: the data has no records, or how many were dropped for which reason."""
    dropped = sum(reasons.values())
    if not dropped:
        return f"{where}: no conversations to train on (no records)"
    listed = ", ".join(f"{reason} {n}" for reason, n in reasons.items() if n)
    longer = f"; over length: longer than seq_length + 1 = {seq_length + 1} tokens" if reasons[OVER_LENGTH] else ""
    return f"{where}: no conversations to train on: all {dropped} records dropped ({listed}){longer}"


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
    if "packing" in stats:
        p = stats["packing"]
        lines.append(f"  packed   {p['conversations']} train conversations into {p['rows']} rows (unpacked "
                     f"{p['rows_unpacked']}): padding {100 * p['padding_fraction']:.1f}% of the row slots "
                     f"(unpacked {100 * p['padding_fraction_unpacked']:.1f}%)")
    for source in stats["sources"]:
        lines.append(f"  source {source['path']} (weight {source['weight']:g}): {source['records']} records, "
                     f"{source['dropped']} dropped, {source['train_rows']} train rows"
                     + (f", {source['heldout_rows']} held-out rows" if "heldout_rows" in source else ""))
    if stats["questionable_records"]:
        kinds = ", ".join(f"{kind} {n}" for kind, n in stats["questionable_kinds"].items() if n)
        lines.append(f"  {stats['questionable_records']} questionable records ({kinds}); those of no kind that "
                     f"data.drop names are kept, built as r1.0 builds them (docs/data.md, \"Which rule applies to "
                     f"which record\")")
    if stats["control_text_records"]:
        lines.append(f"  {stats['control_text_records']} records contain the text {', '.join(CONTROL_TEXTS)}: "
                     f"encoded as text, not control tokens (MindFormers r1.0 made them control ids, so its rows "
                     f"differ there)")
    return "\n".join(lines)


def _check_drop(drop):
    drop = list(drop or ())
    unknown = [kind for kind in drop if kind not in DROPPABLE]
    if unknown:
        raise InputError(f"data.drop: unknown kind {', '.join(map(repr, unknown))} (expected some of "
                         f"{', '.join(DROPPABLE)})")
    return drop


# -- the step ------------------------------------------------------------------------------------------

def preprocess_conversations(train, model_file, output_file, seq_length, heldout_file=None,
                             heldout_fraction=0.0, split_seed=0, on_bad_record="fail", stats_file=None,
                             run=None, data_format="auto", sample_seed=0, drop=(), packing=False):
    """Chat data -> `output_file` MindRecord (+ .db), optionally a held-out MindRecord and stats JSON.

    `train` is a data.train value: a path or glob, or a list of sources {path, format, weight}
    (`data_format` is the format of those that name none). `on_bad_record` ("fail" or "skip") is for
    malformed records; `drop` names the kinds of questionable record (KINDS) and "over length" to leave
    out. With `packing` the training rows hold several conversations each (RowPacker) and a segment_ids
    column; the held-out rows stay one conversation each, so that evaluation compares across settings.
    All outputs appear together, or none do. Memory does not grow with the data (module docstring).
    """
    if seq_length < 1:
        raise InputError(f"seq_length must be positive, got {seq_length}")
    sources = parse_sources(train, data_format)
    drop = _check_drop(drop)
    where = ", ".join(s.path for s in sources)
    tok = ChatTokenizer(model_file)
    records = _Records(sources, on_bad_record, drop)
    split = _Split(heldout_fraction, split_seed) if heldout_file else None
    width = seq_length + 1

    # The first pass: what is dropped, and how many rows each source gives each split.
    tally = _Tally(sources)
    key = 0
    for s in range(len(sources)):
        tally.key_start[s] = key
        for batch in _batches(records.conversations(s, key, tally)):
            key += len(batch)
            if OVER_LENGTH in drop:
                length = TokenizedConversations(batch, tok).length
                for c in np.flatnonzero(length > width):
                    tally.dropped(s, Drop(batch[c].file, batch[c].index, OVER_LENGTH,
                                          f"{length[c]} tokens, longer than seq_length + 1 = {width}"),
                                  listed=tally.long_drops)
                batch = [c for c, n in zip(batch, length) if n <= width]
            held = split.of(batch) if split else np.zeros(len(batch), bool)
            tally.heldout[s] += int(held.sum())
            tally.train[s] += len(batch) - int(held.sum())
            tally.control[s] += sum(has_control_text(c.texts) for c in batch)
    kept = sum(tally.train) + sum(tally.heldout)
    if not kept:
        raise InputError(_why_nothing_is_left(where, tally.reasons, seq_length))
    rows = tally.split_rows(sources, heldout_file)
    for name, per_source in rows.items():
        if not sum(per_source):
            raise InputError(f"{where}: data.heldout_fraction {heldout_fraction}"
                             + (" and the source weights leave" if name == "train" else " leaves")
                             + f" no {name} rows from {kept} conversations")

    outputs = {"train": Path(output_file), "heldout": Path(heldout_file) if heldout_file else None}
    finals = [p for name in rows for p in (outputs[name], Path(f"{outputs[name]}.db"))]
    finals += [Path(stats_file)] if stats_file else []
    # two int32 columns of seq_length + 1 per row (three packed, at most as many rows), plus MindRecord's
    # page and index overhead (~20%)
    need = int(sum(map(sum, rows.values())) * width * (12 if packing else 8) * 1.2)
    lengths = {name: _Lengths() for name in rows}
    with atomic_outputs(finals, run=run, inputs=[*input_files(sources), model_file], need_bytes=need) as temps:
        temp_of = dict(zip(finals, temps))
        writers = {name: MindRecordWriter(temp_of[outputs[name]],
                                          schema=PACKED_SCHEMA if packing and name == "train" else SCHEMA)
                   for name in rows}
        packer = RowPacker(writers["train"], width) if packing else None
        # The second pass: each source's whole copies, then its sample, in file order; the held-out
        # rows on the first reading of each source.
        for s, source in enumerate(sources):
            whole = int(source.weight // 1)
            sample = _sample(source, s, tally.train[s], sample_seed)
            readings = max(whole + bool(len(sample)), 1 if split and tally.heldout[s] else 0)
            for reading in range(readings):
                position = 0  # of the conversation among the source's training conversations
                for batch in _batches(records.conversations(s, tally.key_start[s])):
                    tokens = TokenizedConversations(batch, tok) if OVER_LENGTH in drop else None
                    usable = tokens.length <= width if tokens is not None else np.ones(len(batch), bool)
                    held = split.of(batch) & usable if split else np.zeros(len(batch), bool)
                    training = usable & ~held
                    if reading < whole:
                        picked = training
                    else:  # the sample's reading
                        at = position + np.cumsum(training) - 1
                        picked = training & np.isin(at, sample[np.searchsorted(sample, position):
                                                                np.searchsorted(sample, position + len(batch))])
                    position += int(training.sum())
                    if reading:
                        held = np.zeros(len(batch), bool)
                    if not (picked.any() or held.any()):
                        continue
                    if tokens is None:  # only what this reading writes is tokenized
                        needed = np.flatnonzero(picked | held)
                        tokens = TokenizedConversations([batch[i] for i in needed], tok)
                        index = np.cumsum(picked | held) - 1
                    else:
                        index = np.arange(len(batch))
                    for name, mask in (("train", picked), ("heldout", held)):
                        if mask.any():
                            chosen = index[mask]
                            input_ids, labels = assemble_rows(tokens, chosen, tok, seq_length)
                            if packer and name == "train":
                                packer.add(input_ids, labels, tokens.length[chosen])
                            else:
                                writers[name].write(input_ids, labels)
                            lengths[name].add(tokens.length[chosen], labels)
        if packer:
            packer.close()
        for name, writer in writers.items():
            writer.commit()
            log.info("wrote %d %s rows", packer.rows if packer and name == "train" else sum(rows[name]), name)
        stats = _stats(sources, tally, rows, lengths, where, seq_length, drop, sample_seed,
                       packer.rows if packer else None)
        if stats_file:
            temp_of[Path(stats_file)].write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
    log.info("%s", summary(stats))
    return stats


class _Split:
    """Which conversations of a batch are held out (is_heldout of their keys)."""

    def __init__(self, fraction, seed):
        self.fraction, self.seed = fraction, seed

    def of(self, batch):
        return np.fromiter((is_heldout(c.key, self.fraction, self.seed) for c in batch), bool, len(batch))


def _stats(sources, tally, rows, lengths, where, seq_length, drop, sample_seed, packed_rows=None):
    stats = {"input": where, "seq_length": seq_length, "drop": drop,
             "skipped": sum(tally.reasons.values()), "drop_reasons": tally.reasons,
             "skipped_records": [d.as_dict() for d in (tally.drops + tally.long_drops)[:LISTED]],
             "questionable_records": sum(tally.questionable_of), "questionable_kinds": tally.kinds,
             "questionable_listed": tally.questionable_listed,
             "control_text_records": sum(tally.control),
             "sample_seed": sample_seed if draws_samples(sources) else None, "sources": []}
    for s, source in enumerate(sources):
        mine = [f for f in tally.files if f["source"] == s]
        stats["sources"].append({
            "path": source.path, "weight": source.weight,
            "files": [{k: f[k] for k in ("file", "format", "records")} for f in mine],
            "records": sum(f["records"] for f in mine),
            "dropped": tally.dropped_of[s], "questionable": tally.questionable_of[s],
            "control_text_records": tally.control[s],
            **{f"{name}_rows": per_source[s] for name, per_source in rows.items()},
        })
    for name, split_lengths in lengths.items():
        stats[name] = row_stats(split_lengths, seq_length)
    if packed_rows is not None:
        train = stats["train"]
        stats["packing"] = {"conversations": train["samples"], "rows": packed_rows, "rows_unpacked": train["samples"],
                            "padding_fraction": _padding(train["tokens"], packed_rows, seq_length),
                            "padding_fraction_unpacked": _padding(train["tokens"], train["samples"], seq_length)}
    return stats


def _padding(tokens, rows, seq_length):
    """The share of a split's row slots that are padding."""
    return round(1 - tokens / (rows * (seq_length + 1)), 4)
