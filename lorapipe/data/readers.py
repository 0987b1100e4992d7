"""Chat data files read one record at a time, with one clear error for input that cannot be read.

JSON Lines a line at a time, a JSON array by json's own scanner over a sliding window of READ_CHUNK
bytes; the error names the file and where."""

import json
import re
from pathlib import Path

from lorapipe.data.sources import FORMATS
from lorapipe.errors import InputError

READ_CHUNK = 1 << 20   # bytes of a JSON file decoded at a time


class InvalidLine:
    """A JSON Lines line that is not JSON: a malformed record, dropped or reported like any other."""

    def __init__(self, problem):
        self.problem = problem


def iter_records(path):
    """The records of one JSON (an array) or JSON Lines file, one at a time; one clear InputError,
    naming the file and where, for input that cannot be read.

    `.jsonl`/`.ndjson` files are JSON Lines. Any other file is a JSON array, or JSON Lines when it holds
    more than one value (JSON Lines named `.json`). A JSON Lines line that is not JSON is a malformed
    record (InvalidLine); an array that is not JSON fails the file. A UTF-8 byte order mark is ignored.
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
                yield InvalidLine(f"line {number} is not JSON ({e.msg} at column {e.colno})")


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
