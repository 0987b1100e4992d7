"""A MindSpore checkpoint file in either format MindFormers reads: .ckpt or .safetensors, by its suffix.

checkpoint.format in the config picks the format of everything lorapipe writes for MindFormers (the converted
base, the training checkpoints, filter_out, merged_ckpt and the folded one); what reads them goes through
here, so that each reader takes either. Names, dtypes and values are the same in both: only the container
differs (lorapipe.formats.msckpt, lorapipe.formats.hf_io's safetensors reader and writer).
"""

import contextlib
from pathlib import Path

from lorapipe.errors import InputError
from lorapipe.formats import msckpt
from lorapipe.formats.hf_io import (
    SafetensorsWriter,
    _safetensors_refs,
    read_in_file_order,
)

CKPT, SAFETENSORS = ".ckpt", ".safetensors"
SUFFIXES = (CKPT, SAFETENSORS)
SUFFIX = {"ckpt": CKPT, "safetensors": SAFETENSORS}  # checkpoint.format -> file suffix


def checkpoint_files(folder, suffixes=SUFFIXES):
    """The checkpoint files directly in `folder`, by name (none where there is no such folder)."""
    return sorted(p for p in Path(folder).glob("*") if p.suffix in suffixes)


def the_checkpoint(folder, suffixes=SUFFIXES):
    """The one checkpoint file in `folder`; an InputError naming the folder when there is none, or several."""
    found = checkpoint_files(folder, suffixes)
    if len(found) != 1:
        raise InputError(f"{folder}: expected one {' or '.join(suffixes)} checkpoint, found "
                         f"{[p.name for p in found] or 'none'}")
    return found[0]


def is_safetensors(path):
    return str(path).endswith(SAFETENSORS)


def checkpoint_index(path):
    """[(name, MindSpore type name, shape)] in file order, reading headers only."""
    if not is_safetensors(path):
        return msckpt.checkpoint_index(path)
    if not Path(path).is_file():
        raise InputError(f"{path}: checkpoint not found")
    return [(r.name, msckpt.tensor_type(r.dtype), r.shape) for r in _refs(path)]


def _refs(path):
    return sorted(_safetensors_refs(Path(path)), key=lambda r: r.offset)


def iter_checkpoint(path, select=None, hashed=False):
    """Yield (name, numpy array) one tensor at a time in file order; `select` and `hashed` as
    lorapipe.formats.msckpt.iter_checkpoint's (a safetensors file is always hashed as it is read)."""
    if not is_safetensors(path):
        yield from msckpt.iter_checkpoint(path, select, hashed)
        return
    refs = [r for r in _refs(path) if select is None or select(r.name)]
    buffer = bytearray(max((r.nbytes for r in refs), default=0))
    for ref, array in read_in_file_order(refs, buffer):
        yield ref.name, array.copy()


@contextlib.contextmanager
def checkpoint_writer(path, plan):
    """A writer whose add(name, array) takes the tensors of `plan` [(name, numpy dtype, shape)] in order
    (a safetensors header holds every offset, so the plan comes first; a .ckpt needs none)."""
    if is_safetensors(path):
        writer = SafetensorsWriter(path, [(name, dtype, tuple(shape)) for name, dtype, shape in plan])
        try:
            yield writer
        finally:
            writer.close()
    else:
        with msckpt.CheckpointWriter(path) as writer:
            yield writer
