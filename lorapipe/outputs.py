"""Atomic outputs with a provenance manifest.

Every artifact is written under a temporary name next to its final path and renamed into place only
when the whole step succeeded, so a failed or killed step leaves no partial output. Then the step's
manifest (`<first output>.manifest.json`, see provenance.py) is written beside the artifacts.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def remove_path(path):
    """Delete a file, symlink or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_outputs(paths, run=None, inputs=(), hashed_inline=()):
    """Yield one temporary path per final path; rename them all into place on success.

    `paths` may name files or directories (a directory output is written as a temporary directory).
    On any exception the temporaries are deleted, no final path is left half-written, and the
    exception propagates. With a provenance `run`, its manifest over `inputs` and the outputs is
    written after the rename. `hashed_inline` are inputs the step hashes as it reads them
    (lorapipe.digests.HashingReader), which the manifest then need not read again.
    """
    finals = [Path(p) for p in paths]
    # Temporaries keep their final file names, in a hidden folder beside them: some formats record
    # their own file name (a MindRecord's header names its shards), so only the folder may change.
    temp_dirs = sorted({f.parent / f".lorapipe-tmp-{os.getpid()}" for f in finals})
    temps = [f.parent / f".lorapipe-tmp-{os.getpid()}" / f.name for f in finals]
    for d in temp_dirs:
        remove_path(d)
        d.mkdir(parents=True)
    if run is not None:
        run.hash_inputs(inputs, finals, hashed_inline)
    try:
        yield temps
        if run is not None:
            remove_path(run.manifest_path(finals))
        for temp, final in zip(temps, finals):
            if not (temp.exists() or temp.is_symlink()):
                raise RuntimeError(f"the step finished without writing its output {final}")  # a bug
        for temp, final in zip(temps, finals):
            remove_path(final)
            os.replace(temp, final)
    except BaseException:
        if run is not None:
            run.cancel()
        raise
    finally:
        for d in temp_dirs:
            remove_path(d)
    if run is not None:
        run.write_manifest(inputs=inputs, outputs=finals)
