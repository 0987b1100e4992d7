#!/usr/bin/env python
"""Benchmark: benchmark scoring (snakemake eval_tasks) against lm-evaluation-harness's hf backend, questions/s.

Builds a tiny Baichuan2 base with room for 5-shot prompts (hidden 512, 4 layers, 8 heads, FFN 1376, vocab
1000, 4,096 positions), its converted checkpoint and its Llama export, then scores the same MMLU questions
(5-shot, SUBJECTS, the first --limit of each) with
  lorapipe   - lorapipe.infer.scoring on the host (fp32; each subject's prefix once, batches of similar length):
               the time of score_task, tokenization included, model loading not
  lm-eval    - `lm_eval run --model hf` (fp32, CPU) on the Llama export, at each of --batch_sizes. Its start
               (imports, model and task loading) is left out: it runs at --limit and at 2 x --limit, and the
               rate is the extra questions over the extra seconds.
Both with --threads threads (OMP_NUM_THREADS; torch follows it). lm-eval comes from $LORAPIPE_LMEVAL_PYTHON or
.venv-lmeval (make test-lmeval builds it); MMLU from ../shared/eval (or LORAPIPE_EVAL_DIR). It also checks that
both pick the same answers. Goal (issue 31): lorapipe >= 2x the questions/s of lm-eval at its best batch size.

    .venv/bin/python benchmarks/eval_tasks.py [--limit 10] [--threads 2]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "lmeval")]
SUBJECTS = ["anatomy", "astronomy", "college_biology", "high_school_geography", "marketing", "world_religions"]
DIMS = dict(seed=0, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1376,
            max_position_embeddings=4096, vocab_size=1000, init_std=0.02)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch_sizes", default="1,4,16")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorapipe-bench-eval")
    args = p.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(args.workdir / "mindformers"))
    python = os.environ.get("LORAPIPE_LMEVAL_PYTHON") or str(REPO / ".venv-lmeval" / "bin" / "python")
    eval_dir = Path(os.environ.get("LORAPIPE_EVAL_DIR", REPO.parent / "shared" / "eval"))

    from lm_eval_tasks import run_lm_eval, write_tasks

    from lorapipe.exports.llama import export_llama
    from lorapipe.infer.loader import load_weights
    from lorapipe.infer.scoring import HostScorer, score_task
    from lorapipe.infer.tasks import load_task
    from lorapipe.model.architecture import mindformers_model_config
    from lorapipe.model.tokenizer import ChatTokenizer
    from lorapipe.weights.convert import convert_hf_to_mindspore
    from lorapipe.weights.tiny_base import build_tiny_base

    work = args.workdir
    base = work / "base"
    if not (base / "config.json").is_file():
        build_tiny_base(REPO / "data" / "belle_sample.json", base, **DIMS)
    ckpt = work / "ckpt" / "base.ckpt"
    if not ckpt.is_file():
        convert_hf_to_mindspore(base, ckpt)
    hf_dir = work / "hf_llama"
    if not (hf_dir / "model.safetensors").is_file():
        export_llama(ckpt, base, hf_dir, "rope")
    hf_config = json.loads((base / "config.json").read_text())
    max_length = hf_config["max_position_embeddings"]
    config = mindformers_model_config(hf_config, max_length)
    tok = ChatTokenizer(base / "tokenizer.model")

    def ours(limit):
        task = load_task({"name": "mmlu", "path": str(eval_dir / "mmlu.zip"), "shots": 5, "subjects": SUBJECTS,
                          "limit": limit})
        weights = load_weights(config, ckpt)
        start = time.perf_counter()
        samples, summary = score_task(task, tok, {"base": lambda: HostScorer(weights, config, max_length)},
                                      max_length)
        return samples, summary, time.perf_counter() - start

    samples, summary, seconds = ours(args.limit)
    lengths = [len(tok.encode([prefix])[0]) for prefix, _ in load_task(
        {"name": "mmlu", "path": str(eval_dir / "mmlu.zip"), "shots": 5, "subjects": SUBJECTS}).subjects.values()]
    n = len(samples)
    print(f"{n} MMLU questions, 5-shot, {len(SUBJECTS)} subjects; prefixes {min(lengths)}-{max(lengths)} tokens, "
          f"{summary['truncated_prompts']} prompts truncated at {max_length}; {args.threads} threads")
    rows = [("lorapipe", seconds, n / seconds)]
    tasks = write_tasks(python, "mmlu", eval_dir / "mmlu.zip", SUBJECTS, work / "lm_eval_tasks")
    picks = {(s["subject"], s["index"]): s["base"]["pick"] for s in samples}
    for batch in map(int, args.batch_sizes.split(",")):
        _, short = run_lm_eval(python, hf_dir, tasks, work / "lm_eval_tasks", work / f"out{batch}a", 5, args.limit,
                               batch, args.threads)
        theirs, long = run_lm_eval(python, hf_dir, tasks, work / "lm_eval_tasks", work / f"out{batch}b", 5,
                                   2 * args.limit, batch, args.threads)
        rows.append((f"lm-eval hf, batch {batch}", long - short, n / (long - short)))
        differ = sum(max(range(4), key=lambda j: float(s["resps"][j][0][0])) != picks[key]
                     for t, ss in theirs.items() for s in ss
                     if (key := (t[len("local_mmlu_"):], s["doc"]["index"])) in picks)
        print(f"  lm-eval batch {batch}: {short:.1f} s at limit {args.limit}, {long:.1f} s at {2 * args.limit}; "
              f"{differ} picks differ from lorapipe's")
    best = max(r[2] for r in rows[1:])
    print("\n| scorer | seconds for the questions | questions/s | x lm-eval best |\n|---|---|---|---|")
    for name, s, rate in rows:
        print(f"| {name} | {s:.2f} | {rate:.2f} | {rate / best:.2f} |")


if __name__ == "__main__":
    main()
