"""Conversations -> the recipe's MindRecord rows, vectorised, and packing several conversations into a row.

Row layout (seq_length N gives rows of N + 1 tokens; the model shifts them by one), r1.0's:
  user turn:      input += [user] + ids,       labels += [eos] + [-100] * len(ids)
  assistant turn: input += [assistant] + ids,  labels += [-100] + ids
  then input += [eos], labels += [eos]; truncate to N + 1; pad input with 0 and labels with -100.
user/assistant are the ids of `<reserved_106>`/`<reserved_107>` looked up in the tokenizer. No turns at
all (an empty `conversations` list) gives r1.0's eos-only row.
"""

from itertools import chain

import numpy as np

IGNORE_TOKEN_ID = -100


PAD_ID = 0


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

    def __init__(self, writer, width, chunk):
        self.writer, self.width, self.chunk = writer, width, chunk  # chunk: finished rows written at a time
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
        if len(self._done) >= self.chunk:
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
