"""Provenance manifests: every artifact says exactly what made it.

A step's manifest `<first output>.manifest.json` sits beside its artifacts (so it travels with them
when they are copied) and records the rule, the parameters that reached it, sha256 of each input and
output, the project's git commit, the software stack, the device, wall time and peak memory. Paths in
a manifest are relative to the manifest's directory, so a results tree can be moved as a whole.
Inputs made by another lorapipe step point at that step's manifest, which is how `scripts/provenance.py`
walks an artifact's chain back to its sources.
"""

import json
import os
import platform
import resource
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import psutil

from lorapipe.digests import sha256_file
from lorapipe.errors import InputError

MANIFEST_SUFFIX = ".manifest.json"
PACKAGES = ("mindspore", "mindformers", "torch", "transformers", "snakemake", "sentencepiece", "numpy", "gguf")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _files(path):
    """The files an artifact consists of: the file itself, or every file under a directory."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def _rel(path, start):
    return os.path.relpath(os.path.abspath(path), os.path.abspath(start))


def load_manifest(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find_manifest(path, levels=3):
    """The manifest of the lorapipe step that wrote `path`, searching its folder and a few above.

    Returns (manifest_path, manifest, entry) or None for a source file no step made.
    """
    path = Path(os.path.abspath(path))
    folder = path.parent
    for _ in range(levels):
        for candidate in sorted(folder.glob("*" + MANIFEST_SUFFIX)):
            try:
                manifest = load_manifest(candidate)
            except (OSError, ValueError):
                continue
            for rel, entry in manifest.get("outputs", {}).items():
                if Path(os.path.abspath(candidate.parent / rel)) == path:
                    return candidate, manifest, entry
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def file_record(path, base, check_upstream=False):
    """{sha256, bytes, mtime_ns} of one file. With `check_upstream`, an input another lorapipe step
    made also names that step's manifest, and must still hold the bytes the manifest records: a
    corrupt or edited artifact stops the step that would read it."""
    st = os.stat(path)
    record = {"sha256": sha256_file(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    found = find_manifest(path) if check_upstream else None
    if found:
        manifest_path, manifest, entry = found
        record["manifest"] = _rel(manifest_path, base)
        if entry["sha256"] != record["sha256"]:
            raise InputError(f"{path}: changed since the {manifest['rule']} step wrote it (sha256 "
                             f"{record['sha256'][:12]}..., its manifest {manifest_path} records "
                             f"{entry['sha256'][:12]}...): corrupt or edited; rebuild it with "
                             f"snakemake --forcerun {manifest['rule']}")
    return record


def git_state(root=PROJECT_ROOT):
    """{commit, dirty} of the project checkout, or None outside a git checkout."""
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return None


def package_versions():
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peak_rss_mb():
    """Peak resident memory of this process and its waited-for children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


class Run:
    """One execution of a step; create it when the step starts, hand it to atomic_outputs."""

    def __init__(self, rule, params, device_target="CPU", deterministic=True, note=None):
        self.rule = rule
        self.params = params
        self.device_target = device_target
        self.deterministic = deterministic
        self.note = note
        self.started = psutil.Process().create_time()  # the step's whole process, imports included
        self._hashing = None  # hash_inputs() starts it, stage_manifest() collects it

    @staticmethod
    def manifest_path(outputs):
        first = Path(outputs[0])
        return first.parent / (first.name + MANIFEST_SUFFIX)

    def hash_inputs(self, inputs, outputs, hashed_inline=()):
        """Start hashing the inputs on a background thread (hashlib releases the GIL), so that
        reading a 15 GB base model for its sha256 overlaps the step's own work. Inputs the step hashes
        itself as it reads them (`hashed_inline`, lorapipe.digests) are recorded at the end instead."""
        base = self.manifest_path(outputs).parent
        inline = {os.path.abspath(f) for f in hashed_inline}
        self._hashing = ThreadPoolExecutor(max_workers=1)
        self._input_records = {}
        for f in (f for p in inputs for f in _files(p)):
            hashing = None if os.path.abspath(f) in inline else self._hashing.submit(file_record, f, base, True)
            self._input_records[_rel(f, base)] = (f, hashing)

    def cancel(self):
        if self._hashing is not None:
            self._hashing.shutdown(wait=False, cancel_futures=True)

    def stage_manifest(self, inputs, outputs, temps, dest):
        """Write the manifest for `outputs`, still at their temporary paths `temps`, to `dest`; raise
        InputError if an input is no longer what its step wrote."""
        base = self.manifest_path(outputs).parent
        if self._hashing is None:
            self.hash_inputs(inputs, outputs)
        input_records = {rel: hashing.result() if hashing else file_record(file, base, True)
                         for rel, (file, hashing) in self._input_records.items()}
        self._hashing.shutdown()
        output_records = {}
        for final, temp in zip(outputs, temps):
            for file in _files(temp):
                output_records[_rel(Path(final) / file.relative_to(temp) if file != temp else final, base)] = \
                    file_record(file, base)
        manifest = {
            "lorapipe_manifest": 1,
            "rule": self.rule,
            "params": self.params,
            "inputs": input_records,
            "outputs": output_records,
            "deterministic": self.deterministic,
            "note": self.note,
            "git": git_state(),
            "python": platform.python_version(),
            "packages": package_versions(),
            "device_target": self.device_target,
            "host": platform.node(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_seconds": round(time.time() - self.started, 3),
            "peak_rss_mb": peak_rss_mb(),
        }
        with open(dest, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
            f.write("\n")
        return dest


def _abs(manifest_path, rel):
    return Path(os.path.normpath(Path(manifest_path).parent / rel))


def trace(artifact):
    """The steps that made `artifact`, newest first: [(depth, manifest_path, manifest)].

    Follows each input that a lorapipe step made to that step's manifest; an input without one is a
    source (base model download, dataset, tokenizer). Each step appears once.
    """
    found = find_manifest(artifact)
    if found is None:
        raise InputError(f"{artifact}: no lorapipe manifest lists this file (looked for "
                                f"*{MANIFEST_SUFFIX} in its folder and the folders above)")
    steps, seen = [], set()

    def visit(manifest_path, manifest, depth):
        key = os.path.abspath(manifest_path)
        if key in seen:
            return
        seen.add(key)
        steps.append((depth, Path(manifest_path), manifest))
        for rel, entry in manifest["inputs"].items():
            if "manifest" in entry:
                upstream = _abs(manifest_path, entry["manifest"])
                visit(upstream, load_manifest(upstream), depth + 1)

    visit(found[0], found[1], 0)
    return steps


def verify(steps):
    """Re-hash every file the steps' manifests list; return [(path, problem)] for files that changed."""
    problems = []
    for _, manifest_path, manifest in steps:
        for section in ("inputs", "outputs"):
            for rel, entry in manifest[section].items():
                path = _abs(manifest_path, rel)
                if not path.is_file():
                    problems.append((path, "missing"))
                elif sha256_file(path, fresh=True) != entry["sha256"]:
                    problems.append((path, f"changed since {manifest['rule']} recorded it"))
    return sorted(set(problems))
