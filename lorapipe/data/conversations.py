"""The sources' records, in order, as Conversations, with what is dropped reported.

Malformed records and the kinds data.drop names are left out and reported; each conversation carries
its held-out split key."""

import hashlib
from dataclasses import dataclass

from lorapipe.data.readers import detect_format, iter_records
from lorapipe.data.sources import input_files, parse_sources
from lorapipe.data.turns import BadRecord, Conversation, to_turns
from lorapipe.errors import InputError


@dataclass
class Drop:
    """A record left out: where it is, which of DROP_REASONS and the detail."""
    file: str
    index: int
    reason: str
    problem: str

    def as_dict(self):
        return {"file": self.file, "index": self.index, "reason": self.reason, "problem": self.problem}


class Records:
    """The sources' records in order, a file at a time, as Conversations: what both passes read.

    `conversations(s, key)` yields the conversations of source s that are not dropped for what the
    record is (malformed under on_bad_record "skip", a kind data.drop names), each with its split key:
    its `id`, or its position among those conversations of all sources, counted from `key`. With a
    Tally (the first pass) it also reports what it leaves out, and fails on a malformed record under
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


def conversation_texts(train):
    """The turn texts of the conversations of a data.train value (tokenizer training input): malformed
    records are the mindrecord step's to report; here they are left out, as are blank texts."""
    records = Records(parse_sources(train), "skip", ())
    texts = [text for s in range(len(records.sources)) for c in records.conversations(s, 0)
             for text in c.texts if text.strip()]
    if not texts:
        raise InputError(f"{train}: no conversations to train a tokenizer on")
    return texts


def is_heldout(record_id, fraction, seed):
    """Whether a conversation belongs to the held-out split.

    Decided by a hash of (seed, id), not by position: adding, removing or reordering other records
    never moves a conversation between train and held-out.
    """
    digest = hashlib.sha256(f"{seed}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
