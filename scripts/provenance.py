#!/usr/bin/env python
"""Print the chain of steps that made an artifact, from the manifests alone; --verify re-hashes."""

import argparse
import os
import sys
from pathlib import Path

from lorapipe.errors import InputError
from lorapipe.provenance import trace, verify


def describe(depth, manifest_path, manifest):
    pad = "    " * depth
    git = manifest.get("git") or {}
    commit = (git.get("commit") or "no git")[:10] + (" (dirty)" if git.get("dirty") else "")
    lines = [f"{pad}{manifest['rule']}  [{os.path.relpath(manifest_path)}]",
             f"{pad}  made {manifest['finished']} on {manifest['device_target']}, lorapipe {commit}, "
             f"{manifest['wall_seconds']} s, peak {manifest['peak_rss_mb']} MiB"
             + ("" if manifest.get("deterministic", True) else "  (not byte-reproducible)")]
    if manifest["params"]:
        lines.append(f"{pad}  params: " + ", ".join(f"{k}={v}" for k, v in manifest["params"].items()))
    for section in ("outputs", "inputs"):
        for rel, entry in manifest[section].items():
            origin = "" if section == "outputs" or "manifest" in entry else "  (source)"
            lines.append(f"{pad}  {section[:-1]:6} {entry['sha256'][:12]}  {rel}{origin}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("artifact", type=Path)
    p.add_argument("--verify", action="store_true", help="re-hash every file in the chain")
    args = p.parse_args()
    try:
        steps = trace(args.artifact)
    except InputError as e:
        sys.exit(f"error: {e}")
    print("\n".join(describe(*step) for step in steps))
    if args.verify:
        problems = verify(steps)
        for path, problem in problems:
            print(f"CHANGED {path}: {problem}")
        print(f"verify: {len(problems)} problem(s) in {len(steps)} step(s)")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
