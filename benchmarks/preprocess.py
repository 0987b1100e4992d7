#!/usr/bin/env python
"""Benchmark: chat JSON -> MindRecord, lorapipe against the recipe's per-sample loop and the floor, in one run.

On N conversations (default 24,000: the sample data repeated under new ids), seq_length 512, times
  recipe loop  - the recipe's belle_preprocess.py: its preprocess (tests/recipe_r10.py) encodes each
                 message of each sample on its own and builds the rows in Python lists, then one
                 FileWriter.write_raw_data call per sample
  lorapipe     - lorapipe.data.pipeline.preprocess_conversations on the same JSON file: read, check, tokenize,
                 assemble the rows, write the MindRecord and its stats
  floor        - what any preprocessing must do: tokenize every message and write the finished rows;
                 timed as the sum of
  tokenize       the batched encode alone (sentencepiece's threads on every core), and
  write          lorapipe's MindRecord writer alone, on rows built beforehand
  FileWriter     for comparison: MindSpore's FileWriter.write_raw_data on the same rows (1,000-row
                 batches), the public API lorapipe's writer bypasses for speed
checks that all four MindRecords hold identical rows, byte for byte, and prints a markdown table of wall
and CPU seconds (all threads; up to 2 per wall second on 2 cores) and their ratios.
Everything runs in one process with MindSpore already imported, so no method pays for the import. The
methods run in turn, --repeat times; the table gives each one's median (a shared machine is noisy).

    .venv/bin/python benchmarks/preprocess.py [--conversations 24000] [--repeat 3] [--tokenizer results/tiny/tiny_base/tokenizer.model]

With --scale, instead: scripts/belle_preprocess.py (what the mindrecord rule runs: reading, two passes,
tokenizing, writing, provenance hashes) at seq_length 512, each run in its own process, on JSON Lines of
100,000, 400,000 and 1,600,000 conversations (the sample data repeated under distinct ids), then on a
JSON array of the largest size; a markdown table of wall and CPU seconds, microseconds per
conversation and peak RSS, and how much the peak grows per conversation from one size to the next.
Needs, per million conversations, about 0.2 GB of disk for the input and 1.4 GB for the
MindRecord (MindRecord compresses the int32 columns; one input and one output at a time, in --workdir):

    .venv/bin/python benchmarks/preprocess.py --scale [--sizes 100000 400000 1600000] [--workdir DIR]
"""

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import measure_usage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import recipe_r10  # noqa: E402  (r1.0's preprocess, the one copy: tests/recipe_r10.py)

# MindSpore and lorapipe.data.pipeline are imported where used: the scale runs measure the peak RSS of child
# processes, which starts from this process's (benchmarks/common.py measure), so it stays small.


def recipe_loop(records, tok, seq_length, out):
    """r1.0's belle_preprocess.py: its preprocess (tests/recipe_r10.py) builds every row, then one
    FileWriter.write_raw_data call per row."""
    from mindspore.mindrecord import FileWriter

    from lorapipe.formats.mindrecord import SCHEMA

    writer = FileWriter(str(out), shard_num=1, overwrite=True)
    writer.add_schema(SCHEMA, "belle_baichuan2")
    rows = recipe_r10.preprocess(records, recipe_r10.SentencePieceTokenizer(tok.sp), seq_length + 1, tok.user,
                                 tok.assistant)
    for input_ids, labels in zip(rows["input_ids"], rows["labels"]):
        writer.write_raw_data([{"input_ids": input_ids, "labels": labels}])
    writer.commit()


def write_rows(input_ids, labels, out, batch=4096):
    from lorapipe.formats.mindrecord import MindRecordWriter

    writer = MindRecordWriter(out)
    for start in range(0, len(input_ids), batch):
        writer.write(input_ids[start:start + batch], labels[start:start + batch])
    writer.commit()


def file_writer_rows(rows, out, batch=1000):
    from mindspore.mindrecord import FileWriter

    from lorapipe.formats.mindrecord import SCHEMA

    writer = FileWriter(str(out), shard_num=1, overwrite=True)
    writer.add_schema(SCHEMA, "belle_baichuan2")
    for start in range(0, len(rows), batch):
        writer.write_raw_data([{"input_ids": i, "labels": l} for i, l in rows[start:start + batch]])
    writer.commit()


def read_rows(path):
    import mindspore.dataset as ds

    return [(r["input_ids"].tobytes(), r["labels"].tobytes())
            for r in ds.MindDataset(str(path), shuffle=False).create_dict_iterator(output_numpy=True)]


def timed(fn, *args):
    """(wall seconds, CPU seconds of this process and its threads) of one call."""
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn(*args)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=24000)
    p.add_argument("--seq_length", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tokenizer", type=Path, default=REPO / "results/tiny/tiny_base/tokenizer.model",
                   help="a tokenizer.model (make run builds the tiny one)")
    p.add_argument("--scale", action="store_true", help="time and peak RSS at --sizes instead (see above)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    p.add_argument("--workdir", type=Path, default=None, help="where the scale runs write (default: a temp dir)")
    args = p.parse_args()
    if args.scale:
        scale(args)
    else:
        compare(args)


def compare(args):
    import mindspore.mindrecord  # noqa: F401  (imported before any method is timed)

    from lorapipe.data.pipeline import preprocess_conversations
    from lorapipe.model.tokenizer import ChatTokenizer

    sample = json.loads((REPO / "data/belle_sample.json").read_text(encoding="utf-8"))
    records = [dict(sample[i % len(sample)], id=f"bench_{i}") for i in range(args.conversations)]
    work = Path(tempfile.mkdtemp(prefix="lorapipe-bench-data-"))
    try:
        source = work / "belle.json"
        source.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        tok = ChatTokenizer(args.tokenizer)
        texts = [m["value"] for r in records for m in r["conversations"]]
        built = recipe_r10.preprocess(records, recipe_r10.SentencePieceTokenizer(tok.sp), args.seq_length + 1,
                                      tok.user, tok.assistant)
        rows = list(zip(built["input_ids"], built["labels"]))
        methods = {
            "recipe loop": (recipe_loop, records, tok, args.seq_length, work / "recipe.mindrecord"),
            "lorapipe": (preprocess_conversations, source, args.tokenizer, work / "ours.mindrecord", args.seq_length),
            "tokenize": (tok.encode, texts),
            "write": (write_rows, np.stack([i for i, _ in rows]), np.stack([l for _, l in rows]),
                      work / "floor.mindrecord"),
            "FileWriter": (file_writer_rows, rows, work / "filewriter.mindrecord"),
        }
        runs = {name: [] for name in methods}
        for _ in range(args.repeat):
            for name, (fn, *fn_args) in methods.items():
                runs[name].append(timed(fn, *fn_args))
        times = {name: statistics.median(wall for wall, _ in r) for name, r in runs.items()}
        cpu = {name: statistics.median(c for _, c in r) for name, r in runs.items()}
        for measure in (times, cpu):
            measure["floor"] = measure["tokenize"] + measure["write"]
        ours = read_rows(work / "ours.mindrecord")
        identical = all(read_rows(work / f"{name}.mindrecord") == ours for name in ("recipe", "floor", "filewriter"))
    finally:
        shutil.rmtree(work)
    print(f"{args.conversations} conversations, seq_length {args.seq_length}, median of {args.repeat} runs, "
          f"rows identical: {identical}\n")
    # On a shared machine the wall time of a run depends on what else runs; its CPU time much less so.
    print("| method | wall s | CPU s | conversations/s | speed-up vs recipe loop: wall, CPU | × floor: wall, CPU |")
    print("|---|---|---|---|---|---|")
    for name in ("recipe loop", "lorapipe", "floor", "tokenize", "write", "FileWriter"):
        t, c = times[name], cpu[name]
        print(f"| {name} | {t:.2f} | {c:.2f} | {args.conversations / t:.0f} | {times['recipe loop'] / t:.1f}×, "
              f"{cpu['recipe loop'] / c:.1f}× | {t / times['floor']:.2f}, {c / cpu['floor']:.2f} |")
    if not identical:
        raise SystemExit("rows differ")




def write_conversations(path, count, array=False):
    """`count` conversations of the sample data under distinct ids, as JSON Lines or a JSON array,
    written as they are made (this process stays small)."""
    sample = json.loads((REPO / "data/belle_sample.json").read_text(encoding="utf-8"))
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" if array else "")
        for i in range(count):
            line = json.dumps(dict(sample[i % len(sample)], id=f"bench_{i}"), ensure_ascii=False)
            f.write((",\n" if array and i else "") + line + ("" if array else "\n"))
        f.write("\n]\n" if array else "")
    return path.stat().st_size


def scale(args):
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lorapipe-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = [(n, "JSON Lines") for n in args.sizes] + [(max(args.sizes), "JSON array")]
    results = []
    try:
        for count, layout in runs:
            source = work / (f"belle_{count}.json" if layout == "JSON array" else f"belle_{count}.jsonl")
            size = write_conversations(source, count, array=layout == "JSON array")
            out = work / "out"
            cmd = [sys.executable, str(REPO / "scripts/belle_preprocess.py"), "--input_glob", str(source),
                   "--seq_length", str(args.seq_length), "--model_file", str(args.tokenizer),
                   "--output_file", str(out / f"belle_{args.seq_length}.mindrecord"),
                   "--stats_file", str(out / "stats.json"), "--log", str(work / "preprocess.log")]
            wall, cpu, rss = measure_usage(cmd)
            stats = json.loads((out / "stats.json").read_text())
            assert stats["train"]["samples"] == count, stats["train"]
            written = sum(f.stat().st_size for f in out.glob("belle_*"))
            results.append((count, layout, size, wall, cpu, rss, written))
            print(f"{count} {layout}: {wall:.1f} s, {cpu:.1f} CPU s, peak RSS {rss:.0f} MiB", flush=True)
            shutil.rmtree(out)
            source.unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(work)
    print(f"\nscripts/belle_preprocess.py, seq_length {args.seq_length}, one process per run\n")
    print("| conversations | input | input MB | MindRecord GB | wall s | CPU s | µs per conversation (wall) "
          "| µs per added conversation (wall, CPU) | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    previous = None
    for count, layout, size, wall, cpu, rss, written in results:
        added = "" if previous is None or previous[0] == count else \
            f"{1e6 * (wall - previous[1]) / (count - previous[0]):.1f}, {1e6 * (cpu - previous[2]) / (count - previous[0]):.1f}"
        print(f"| {count:,} | {layout} | {size / 1e6:.1f} | {written / 1e9:.2f} | {wall:.1f} | {cpu:.1f} "
              f"| {1e6 * wall / count:.1f} | {added} | {rss:.0f} |")
        if layout == "JSON Lines":
            previous = (count, wall, cpu)
    lines = [r for r in results if r[1] == "JSON Lines"]
    for (n0, *_, rss0, _), (n1, *_, rss1, _) in zip(lines, lines[1:]):
        print(f"peak RSS growth from {n0:,} to {n1:,} conversations: {(rss1 - rss0) * 2**20 / (n1 - n0):.1f} "
              f"bytes per conversation")


if __name__ == "__main__":
    main()
