"""The mindrecord step: chat data -> training and held-out MindRecords and the stats JSON.

The rows are built as MindFormers r1.0's belle_preprocess.py builds them, in bounded memory; the
MindRecords come with their `.db` index.

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

import json
import logging
from pathlib import Path

import numpy as np

from lorapipe.data.conversations import Drop, Records, is_heldout
from lorapipe.data.rows import RowPacker, TokenizedConversations, assemble_rows
from lorapipe.data.sources import input_files, parse_sources, sample_positions
from lorapipe.data.stats import (
    Lengths,
    Tally,
    build_stats,
    summary,
    why_nothing_is_left,
)
from lorapipe.data.turns import DROPPABLE, OVER_LENGTH, has_control_text
from lorapipe.errors import InputError
from lorapipe.formats.mindrecord import PACKED_SCHEMA, SCHEMA, MindRecordWriter
from lorapipe.model.tokenizer import ChatTokenizer
from lorapipe.outputs import atomic_outputs

log = logging.getLogger("lorapipe")

ROWS_PER_CHUNK = 4096  # conversations tokenized, assembled and written at a time


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


def _check_drop(drop):
    drop = list(drop or ())
    unknown = [kind for kind in drop if kind not in DROPPABLE]
    if unknown:
        raise InputError(f"data.drop: unknown kind {', '.join(map(repr, unknown))} (expected some of "
                         f"{', '.join(DROPPABLE)})")
    return drop


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
    records = Records(sources, on_bad_record, drop)
    split = _Split(heldout_fraction, split_seed) if heldout_file else None
    width = seq_length + 1

    # The first pass: what is dropped, and how many rows each source gives each split.
    tally = Tally(sources)
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
        raise InputError(why_nothing_is_left(where, tally.reasons, seq_length))
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
    lengths = {name: Lengths() for name in rows}
    with atomic_outputs(finals, run=run, inputs=[*input_files(sources), model_file], need_bytes=need) as temps:
        temp_of = dict(zip(finals, temps))
        writers = {name: MindRecordWriter(temp_of[outputs[name]],
                                          schema=PACKED_SCHEMA if packing and name == "train" else SCHEMA)
                   for name in rows}
        packer = RowPacker(writers["train"], width, ROWS_PER_CHUNK) if packing else None
        # The second pass: each source's whole copies, then its sample, in file order; the held-out
        # rows on the first reading of each source.
        for s, source in enumerate(sources):
            whole = int(source.weight // 1)
            sample = sample_positions(source, s, tally.train[s], sample_seed)
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
        stats = build_stats(sources, tally, rows, lengths, where, seq_length, drop, sample_seed,
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
