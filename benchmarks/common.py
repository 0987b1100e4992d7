"""What the benchmarks share: run one command in its own process, measure wall time and peak RSS."""

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path


def model_args(description, workdir):
    """Parse the synthetic model's shape and a fresh work folder (deleted and recreated)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5504)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--workdir", type=Path, default=Path(workdir))
    p.add_argument("--true-7b", action="store_true", help="Baichuan2-7B widths and vocabulary, 2 layers")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the methods; the best of each is kept")
    args = p.parse_args()
    if args.true_7b:
        args.layers, args.hidden, args.intermediate, args.vocab = 2, 4096, 11008, 125696
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    return args


def measure(cmd):
    """Wall seconds and peak RSS (MiB) of one command in its own process.

    Keep the calling process small: a forked child's peak RSS starts from its parent's."""
    wall, _, rss = measure_usage(cmd)
    return wall, rss


def measure_usage(cmd):
    """Wall seconds, CPU seconds (user + system, all threads) and peak RSS (MiB) of one command in its
    own process (see measure)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def warm(path):
    """Read a file once so that every method reads it from the page cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
