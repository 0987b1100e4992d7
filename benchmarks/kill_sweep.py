#!/usr/bin/env python
"""Kill sweep: SIGKILL the whole Snakemake process group at N points of a tiny-default run, rerun each
time to completion, and check what issue 17 asks:
  * the deterministic artifacts before the (multi-rank, not byte-reproducible) finetune are
    byte-identical to an uninterrupted run's;
  * no temporary is left, `snakemake -n` has nothing to do, and `scripts/provenance.py --verify`
    passes for the merged checkpoint, the predictions and the report.
Kill points cover every rule: an uninterrupted run measures each rule (its benchmark file); each point
waits for one rule's job to start and kills it a fraction of that rule's time later (the middle of every
rule first, then earlier and later in the longest ones up to N). Prints one row per point with the jobs
that were running when it was killed. About a minute per point on 2 cores; tests/test_workflow.py
runs two points of it in `make test`.

    .venv/bin/python benchmarks/kill_sweep.py [--points 20] [--workdir /tmp/lorapipe-kill-sweep]
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DETERMINISTIC_BEFORE_FINETUNE = (
    "tiny_base/pytorch_model.bin", "tiny_base/tokenizer.model", "ckpt/rank_0/baichuan2_tiny.ckpt",
    "data/belle_64.mindrecord", "data/belle_64_heldout.mindrecord", "data/belle_64.stats.json",
    "finetune/run_baichuan2_lora.yaml", "predict/run_baichuan2.yaml", "preflight.json")
VERIFIED = ("merged_ckpt/rank_0/checkpoint_0.ckpt", "predict/predictions.jsonl", "report/summary.html")


def snakemake(workdir, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           "--configfile", str(workdir / "config.yaml"), *args]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def fresh(workdir):
    import yaml

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["data"]["train"] = str(REPO / "data" / "belle_sample.json")
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def check(workdir, reference):
    results = workdir / "results/tiny"
    problems = [f"{a} differs" for a in DETERMINISTIC_BEFORE_FINETUNE
                if (results / a).read_bytes() != (reference / "results/tiny" / a).read_bytes()]
    problems += [f"temporary {p.relative_to(results)} left" for p in results.rglob("*")
                 if p.name.startswith(".lorapipe-tmp-") or ".tmp-" in p.name]
    dry = snakemake(workdir, "-n")
    if "Nothing to be done" not in dry.communicate()[0]:
        problems.append("snakemake -n has work to do")
    for artifact in VERIFIED:
        verify = subprocess.run([sys.executable, str(REPO / "scripts/provenance.py"), "--verify", str(results / artifact)],
                                capture_output=True, text=True)
        if verify.returncode:
            problems.append(f"provenance --verify {artifact} failed")
    return problems


def kill_points(reference, n):
    """(rule, fraction of its time): every rule at 1/2, then the longest ones at 1/4 and 3/4, up to n."""
    seconds = {}
    for tsv in sorted((reference / "results/tiny/benchmarks").glob("*.tsv")):
        seconds[tsv.stem] = float(tsv.read_text().splitlines()[1].split("\t")[0])
    longest = sorted(seconds, key=seconds.get, reverse=True)
    points = [(rule, 0.5) for rule in seconds]
    points += [(rule, fraction) for rule in longest for fraction in (0.25, 0.75)]
    return points[:n], seconds


def kill_during(workdir, rule, delay):
    """Start a run, SIGKILL its process group `delay` s after a job of `rule` starts; return its output."""
    run = snakemake(workdir)
    started = threading.Event()
    lines = []

    def read():
        for line in run.stdout:
            lines.append(line)
            if re.match(rf"(?:local)?rule {rule}:", line):
                started.set()

    reader = threading.Thread(target=read)
    reader.start()
    if not started.wait(timeout=1800):
        raise SystemExit(f"rule {rule} never started")
    time.sleep(delay)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    reader.join()
    return "".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorapipe-kill-sweep"))
    args = p.parse_args()
    reference, workdir = args.workdir / "reference", args.workdir / "run"
    fresh(reference)
    start = time.time()
    run = snakemake(reference)
    run.communicate()  # not wait(): a full pipe would block the run
    if run.returncode:
        sys.exit("the uninterrupted run failed")
    points, seconds = kill_points(reference, args.points)
    print(f"uninterrupted run: {time.time() - start:.0f} s, {len(seconds)} rules\n\n"
          "| # | killed in | after s | running | rerun | problems |\n|---|---|---|---|---|---|")
    failures = 0
    for number, (rule, fraction) in enumerate(points, 1):
        fresh(workdir)
        delay = fraction * seconds[rule]
        log = kill_during(workdir, rule, delay)
        started = re.findall(r"^(?:local)?rule (\w+):", log, re.M)
        finished = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", log)
        running = [r for r in started if started.count(r) > finished.count(r)]
        snakemake(workdir, "--unlock").communicate()
        rerun = snakemake(workdir)
        rerun_log = rerun.communicate()[0]  # not wait(): a full pipe would block the run
        ok = rerun.returncode == 0
        problems = check(workdir, reference) if ok else ["rerun failed: " + rerun_log[-300:]]
        failures += bool(problems)
        print(f"| {number} | {rule} ({fraction:.0%}) | {delay:.1f} | {', '.join(dict.fromkeys(running)) or '-'} | "
              f"{'ok' if ok else 'FAILED'} | {'; '.join(problems) or 'none'} |", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
