"""The sources of data.train: files or globs, each with its layout, its weight and a fractional weight's sample."""

import glob
from dataclasses import dataclass

import numpy as np

from lorapipe.errors import InputError

FORMATS = ("belle", "sharegpt", "alpaca", "messages")


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


def sample_size(source, count):
    """How many of a source's `count` training conversations its weight's fraction draws."""
    return round(source.weight % 1 * count)


def sample_positions(source, s, count, seed):
    """The sorted positions, among a source's `count` training conversations, of the sample its weight's
    fraction draws: without replacement, by a generator seeded with (seed, source index). The same draw
    as numpy's choice over the conversations themselves, so the same rows as when all were in memory."""
    size = sample_size(source, count)
    if not size:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng([seed, s]).choice(count, size, replace=False))
