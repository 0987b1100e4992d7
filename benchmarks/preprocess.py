#!/usr/bin/env python
"""Benchmark: BELLE JSON -> MindRecord, lorapipe vs the recipe's per-sample loop, in one run.

On N conversations (default 20,000: the sample data repeated under new ids), times
  recipe loop  - the recipe's belle_preprocess.py approach: encode each message of each sample on its
                 own, then one FileWriter.write_raw_data call per sample
  lorapipe     - lorapipe.data.preprocess_belle: one batched multi-threaded encode, batched writes
  tokenize     - the batched encode alone: the limit for any preprocessing
checks that both MindRecords hold identical rows, and prints a markdown table.

    .venv/bin/python benchmarks/preprocess.py [--conversations 20000] [--tokenizer results/tiny/tiny_base/tokenizer.model]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mindspore.dataset as ds
from mindspore.mindrecord import FileWriter

from lorapipe.data import SCHEMA, ChatTokenizer, build_row, preprocess_belle

REPO = Path(__file__).resolve().parent.parent


def recipe_loop(records, tok, seq_length, out):
    writer = FileWriter(str(out), shard_num=1, overwrite=True)
    writer.add_schema(SCHEMA, "belle_baichuan2")
    for record in records:
        messages = record["conversations"]
        ids = [tok.sp.encode(m["value"]) for m in messages]
        input_ids, labels, _ = build_row(messages, ids, tok, seq_length)
        writer.write_raw_data([{"input_ids": input_ids, "labels": labels}])
    writer.commit()


def rows(path):
    return [(r["input_ids"].tobytes(), r["labels"].tobytes())
            for r in ds.MindDataset(str(path), shuffle=False).create_dict_iterator(output_numpy=True)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=20000)
    p.add_argument("--seq_length", type=int, default=512)
    p.add_argument("--tokenizer", type=Path, default=REPO / "results/tiny/tiny_base/tokenizer.model",
                   help="a tokenizer.model (make run builds the tiny one)")
    args = p.parse_args()
    sample = json.loads((REPO / "data/belle_sample.json").read_text(encoding="utf-8"))
    records = [dict(sample[i % len(sample)], id=f"bench_{i}") for i in range(args.conversations)]
    work = Path(tempfile.mkdtemp(prefix="lorapipe-bench-data-"))
    try:
        source = work / "belle.json"
        source.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        tok = ChatTokenizer(args.tokenizer)
        times = {}
        start = time.perf_counter()
        recipe_loop(records, tok, args.seq_length, work / "recipe.mindrecord")
        times["recipe loop"] = time.perf_counter() - start
        start = time.perf_counter()
        preprocess_belle(source, args.tokenizer, work / "ours.mindrecord", args.seq_length)
        times["lorapipe"] = time.perf_counter() - start
        start = time.perf_counter()
        tok.encode(m["value"] for r in records for m in r["conversations"])
        times["tokenize"] = time.perf_counter() - start
        identical = rows(work / "recipe.mindrecord") == rows(work / "ours.mindrecord")
    finally:
        shutil.rmtree(work)
    base = times["recipe loop"]
    print(f"{args.conversations} conversations, seq_length {args.seq_length}, rows identical: {identical}\n")
    print("| method | wall s | conversations/s | speed-up vs recipe loop |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.2f} | {args.conversations / t:.0f} | {base / t:.1f}× |")
    if not identical:
        raise SystemExit("rows differ")


if __name__ == "__main__":
    main()
