#!/usr/bin/env python3
"""`make test-matrix`: lorapipe on every supported MindSpore/MindFormers pair.

For each pair (envs/requirements.txt and envs/requirements-ms<version>.txt): a venv of its own under
--matrix_dir (about 4.4 GB each, built once and reused: a stamp file says it is complete), then the tiny
default end to end (`snakemake --cores N`) in a folder of its own, then the fast tests. At the end, one
table (pair, setup s, run s, tests s, pass or fail) and whether the deterministic artifacts (the tiny
base, the converted checkpoint, the MindRecords, the rendered YAMLs) are byte-identical across pairs.

Runs with the system's python3 (no lorapipe import): each pair's own venv runs lorapipe.
"""

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAIRS = {"2.9.0": "requirements.txt", "2.7.2": "requirements-ms2.7.2.txt", "2.7.1": "requirements-ms2.7.1.txt"}
FAST_TESTS = ["tests/test_data.py", "tests/test_weights.py", "tests/test_msckpt.py", "tests/test_config.py",
              "tests/test_golden_yaml.py", "tests/test_checkpoints.py", "tests/test_preflight.py",
              "tests/test_strategy_merge.py", "tests/test_packing.py"]
# What every pair must write byte for byte as the others do (manifests hold run times: left out).
DETERMINISTIC = ["tiny_base/pytorch_model.bin", "tiny_base/tokenizer.model", "ckpt/rank_0/baichuan2_tiny.ckpt",
                 "data/belle_64.mindrecord", "data/belle_64.mindrecord.db", "data/belle_64_heldout.mindrecord",
                 "finetune/run_baichuan2_lora.yaml", "predict/run_baichuan2.yaml"]


def timed(cmd, log, **kwargs):
    """(exit status, seconds) of a command, its output appended to `log`."""
    start = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs).returncode
    return code, time.time() - start


def setup(venv, requirements, log):
    """Build the pair's venv unless its stamp says it is complete; (ok, seconds, "built" or "reused")."""
    stamp = venv / ".lorapipe-matrix-complete"
    if stamp.exists() and stamp.read_text() == requirements.read_text():
        return True, 0.0, "reused"
    stamp.unlink(missing_ok=True)
    start = time.time()
    # an existing venv (an interrupted build, or one made by hand) is completed, not made again
    steps = [] if (venv / "bin/python").exists() else [[sys.executable, "-m", "venv", venv]]
    steps += [[venv / "bin/pip", "install", "--disable-pip-version-check", "-q", "-r", requirements],
              [venv / "bin/pip", "install", "--disable-pip-version-check", "-q", "--no-deps", "--no-build-isolation",
               "-e", REPO]]
    for cmd in steps:
        if timed(cmd, log)[0]:
            return False, time.time() - start, "failed"
    stamp.write_text(requirements.read_text())
    return True, time.time() - start, "built"


def run_pair(version, requirements, matrix_dir, cores):
    venv, workdir = matrix_dir / f"ms{version}", matrix_dir / f"run-ms{version}"
    log = matrix_dir / f"ms{version}.log"
    log.write_text("")
    ok, setup_s, how = setup(venv, REPO / "envs" / requirements, log)
    row = {"pair": version, "setup": setup_s, "how": how, "run": None, "tests": None, "result": "setup failed"}
    if not ok:
        return row, workdir, log
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home())}
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yaml"
    config.write_text((REPO / "config/config.yaml").read_text().replace(
        "train: data/belle_sample.json", f"train: {REPO / 'data/belle_sample.json'}"))
    code, row["run"] = timed([venv / "bin/snakemake", "-s", REPO / "Snakefile", "-d", workdir, "--cores", str(cores),
                              "--configfile", config], log, env=env, cwd=workdir)
    if code:
        row["result"] = "run failed"
        return row, workdir, log
    code, row["tests"] = timed([venv / "bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_TESTS],
                               log, env=env, cwd=REPO)
    row["result"] = "tests failed" if code else "pass"
    return row, workdir, log


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix_dir", type=Path, required=True, help="where the venvs and runs go (~4.4 GB per pair)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    args = p.parse_args()
    args.matrix_dir.mkdir(parents=True, exist_ok=True)
    rows, workdirs = [], {}
    for version in args.pairs:
        print(f"MindSpore {version}: setup, the tiny default, the fast tests (log: {args.matrix_dir}/ms{version}.log)",
              flush=True)
        row, workdirs[version], _ = run_pair(version, PAIRS[version], args.matrix_dir, args.cores)
        rows.append(row)

    def seconds(x):
        return "-" if x is None else f"{x:.0f}"

    print("\n| MindSpore | setup s | run s | tests s | result |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['pair']} | {seconds(row['setup'])} ({row['how']}) | {seconds(row['run'])} | "
              f"{seconds(row['tests'])} | {row['result']} |")
    ran = [v for v, row in zip(args.pairs, rows) if row["run"] is not None and row["result"] != "run failed"]
    differing = [a for a in DETERMINISTIC
                 if len({sha256(workdirs[v] / "results/tiny" / a) for v in ran}) > 1]
    print(f"\nbyte-identical across {', '.join(ran) or 'no pair'}: "
          + ("all of " + ", ".join(DETERMINISTIC) if not differing else f"all but {', '.join(differing)}"))
    sys.exit(0 if all(row["result"] == "pass" for row in rows) and not differing else 1)


if __name__ == "__main__":
    main()
