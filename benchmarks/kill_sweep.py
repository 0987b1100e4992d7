#!/usr/bin/env python
"""Kill sweep: SIGKILL the whole Snakemake process group at N points spread over a tiny-default run,
rerun each time to completion, and check what issue 17 asks:
  * the deterministic artifacts before the (multi-rank, not byte-reproducible) finetune are
    byte-identical to an uninterrupted run's;
  * no temporary is left, `snakemake -n` has nothing to do, and `scripts/provenance.py --verify`
    passes for the merged checkpoint, the predictions and the report.
Prints one row per kill point with the jobs that were running when it was killed. About 2-3 minutes
per point on 2 cores; tests/test_workflow.py runs two points of it in `make test`.

    .venv/bin/python benchmarks/kill_sweep.py [--points 20] [--workdir /tmp/lorapipe-kill-sweep]
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
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
    problems += [f"temporary {p.relative_to(results)} left" for p in results.rglob(".lorapipe-tmp-*")]
    dry = snakemake(workdir, "-n")
    if "Nothing to be done" not in dry.communicate()[0]:
        problems.append("snakemake -n has work to do")
    for artifact in VERIFIED:
        verify = subprocess.run([sys.executable, str(REPO / "scripts/provenance.py"), "--verify", str(results / artifact)],
                                capture_output=True, text=True)
        if verify.returncode:
            problems.append(f"provenance --verify {artifact} failed")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lorapipe-kill-sweep"))
    args = p.parse_args()
    reference, workdir = args.workdir / "reference", args.workdir / "run"
    fresh(reference)
    start = time.time()
    if snakemake(reference).wait():
        sys.exit("the uninterrupted run failed")
    total = time.time() - start
    print(f"uninterrupted run: {total:.0f} s\n\n| # | killed at s | running | rerun | problems |\n|---|---|---|---|---|")
    failures = 0
    for point in range(1, args.points + 1):
        fresh(workdir)
        at = total * point / (args.points + 1)
        run = snakemake(workdir)
        time.sleep(at)
        os.killpg(run.pid, signal.SIGKILL)
        log = run.communicate()[0]
        started = re.findall(r"^(?:local)?rule (\w+):", log, re.M)
        finished = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", log)
        running = [r for r in started if started.count(r) > finished.count(r)]
        snakemake(workdir, "--unlock").wait()
        rerun = snakemake(workdir)
        ok = rerun.wait() == 0
        problems = check(workdir, reference) if ok else ["rerun failed: " + rerun.stdout.read()[-300:]]
        failures += bool(problems)
        print(f"| {point} | {at:.0f} | {', '.join(dict.fromkeys(running)) or '-'} | {'ok' if ok else 'FAILED'} | "
              f"{'; '.join(problems) or 'none'} |", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
