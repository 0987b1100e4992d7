"""Atomic outputs with a provenance manifest.

Every artifact is written under a temporary name next to its final path and renamed into place only
when the whole step succeeded, so a failed or killed step leaves no partial output (and the next run
removes a killed step's temporaries). The step's manifest (`<first output>.manifest.json`, see
provenance.py) goes into place with the artifacts.
"""

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import psutil

from lorapipe.errors import StepError


def remove_path(path):
    """Delete a file, symlink or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ENOSPC (disk full), EFBIG (file size limit, `ulimit -f`), EDQUOT (quota): the write cannot go on.
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_TEMP_PREFIX = ".lorapipe-tmp-"


def remove_stale_temporaries(folder):
    """Delete the temporaries of steps whose process is gone: a SIGKILL skips every cleanup, and the
    rerun must not leave them behind. A live process's (a second run in this folder) are kept."""
    for temp in Path(folder).glob(_TEMP_PREFIX + "*"):
        pid = temp.name[len(_TEMP_PREFIX):]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            remove_path(temp)


def format_bytes(nbytes):
    """A byte count as GB or MB of 1024^3 and 1024^2 bytes (what df -h and MindSpore's max_device_memory
    count in)."""
    return f"{nbytes / (1 << 30):.1f} GB" if nbytes >= (1 << 30) / 10 else f"{nbytes / (1 << 20):.1f} MB"


def check_free_space(what, need_bytes):
    """Refuse to start writing `what` when its file system lacks the room it will take."""
    free = shutil.disk_usage(Path(what).parent).free
    if need_bytes and free < need_bytes * 1.01 + (1 << 20):
        raise StepError(f"{what}: not enough free space: it needs about {format_bytes(need_bytes)}, "
                        f"{Path(what).parent} has {format_bytes(free)} free")


@contextmanager
def atomic_outputs(paths, run=None, inputs=(), hashed_inline=(), need_bytes=0):
    """Yield one temporary path per final path; rename them all into place on success.

    `paths` may name files or directories (a directory output is written as a temporary directory).
    On any exception the temporaries are deleted, no final path is left half-written, and the
    exception propagates; a full disk becomes one StepError naming the output and the space needed.
    `need_bytes`, an estimate of what the step writes, is checked against the free space first. With a
    provenance `run`, its manifest over `inputs` and the outputs is written with them: into place
    after them, or not at all. `hashed_inline` are inputs the step hashes as it reads them
    (lorapipe.digests), which the manifest then need not read again.
    """
    finals = [Path(p) for p in paths]
    # Temporaries keep their final file names, in a hidden folder beside them: some formats record
    # their own file name (a MindRecord's header names its shards), so only the folder may change.
    temp_dirs = sorted({f.parent / f"{_TEMP_PREFIX}{os.getpid()}" for f in finals})
    temps = [f.parent / f"{_TEMP_PREFIX}{os.getpid()}" / f.name for f in finals]
    for d in temp_dirs:
        d.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(d.parent)
        remove_path(d)
        d.mkdir()
    succeeded = False
    try:
        check_free_space(finals[0], need_bytes)
        if run is not None:
            run.hash_inputs(inputs, finals, hashed_inline)
        try:
            yield temps
            for temp, final in zip(temps, finals):
                if not (temp.exists() or temp.is_symlink()):
                    raise RuntimeError(f"the step finished without writing its output {final}")  # a bug
            if run is not None:  # staged beside the outputs, moved in last: never a manifest without them
                manifest = run.stage_manifest(inputs, finals, temps, temp_dirs[0] / run.manifest_path(finals).name)
                remove_path(run.manifest_path(finals))
            for temp, final in zip(temps, finals):
                remove_path(final)
                os.replace(temp, final)
            if run is not None:
                os.replace(manifest, run.manifest_path(finals))
            succeeded = True
        except OSError as e:
            if e.errno in _DISK_FULL:
                free = shutil.disk_usage(temp_dirs[0]).free
                raise StepError(f"{finals[0]}: the disk filled up while writing it ({e.strerror}); "
                                f"{format_bytes(free)} is free in {finals[0].parent}"
                                + (f", the step needs about {format_bytes(need_bytes)}" if need_bytes else "")
                                + ". Nothing was written.") from None
            raise
    finally:
        if run is not None and not succeeded:
            run.cancel()
        for d in temp_dirs:
            remove_path(d)
