"""What preprocessing found and wrote: the tally, row and length statistics, the summary.

The first pass's tally, each split's row and length statistics, and the summary a run logs."""

import logging

import numpy as np

from lorapipe.data.conversations import Drop
from lorapipe.data.rows import IGNORE_TOKEN_ID
from lorapipe.data.sources import draws_samples, sample_size
from lorapipe.data.turns import CONTROL_TEXTS, DROP_REASONS, KINDS, OVER_LENGTH

log = logging.getLogger("lorapipe")

LOGGED = 5            # the first drops, and the first questionable records kept, are logged with file and index


LISTED = 100          # ... and this many of each are listed in the stats JSON


class Tally:
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
        rows = {"train": [self.train[s] * int(source.weight // 1) + sample_size(source, self.train[s])
                          for s, source in enumerate(sources)]}
        if heldout:
            rows["heldout"] = list(self.heldout)
        return rows


class Lengths:
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
    """Counts for one split (`lengths`: Lengths): samples, kept tokens, label tokens, truncation, length
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


def why_nothing_is_left(where, reasons, seq_length):
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


def build_stats(sources, tally, rows, lengths, where, seq_length, drop, sample_seed, packed_rows=None):
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
