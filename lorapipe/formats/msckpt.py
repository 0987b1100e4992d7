"""Streaming reader and writer for MindSpore `.ckpt` files, one tensor in memory at a time.

`mindspore.save_checkpoint` / `load_checkpoint` hold the whole checkpoint in memory; a 7B checkpoint
with Adam state is ~90 GB and our machines have 24 GB. The format is simple enough to stream:

    file   := record* [crc footer]
    record := 0x0A varint(len) Checkpoint.Value
    Value  := {1: tag (string), 2: TensorProto {1: dims (int64, repeated), 2: tensor_type (string,
               "Float32", "BFloat16", ...), 3: tensor_content (raw little-endian bytes)}}
    footer := b"crc_num" + crc32(all preceding bytes) as 10 big-endian bytes (only with crc_check)

MindSpore splits tensors over 512 MiB into consecutive records with the same tag and full dims; the
reader reassembles them and the writer does the same. Files written here load with
`mindspore.load_checkpoint`, and files MindSpore writes read here (see tests/test_msckpt.py).
This module needs numpy only, not MindSpore.
"""

import os

import numpy as np

from lorapipe.digests import HashingFile, OverlappedHash, remember
from lorapipe.errors import InputError

# Beside a training rank's checkpoints when they hold only the trainable parameters: every parameter of
# the network that saved them, in its order, with its dtype ([[name, "Float32"], ...]), written by the rank
# (lorapipe.train.trainer) and read where the frozen base is put back (lorapipe.weights.checkpoints).
PARAMETER_ORDER = "parameter_order.json"
CHUNK_BYTES = 512 << 20
_SKIP_CHUNK = 16 << 20
CRC_MAGIC = b"crc_num"
CRC_FOOTER = len(CRC_MAGIC) + 10

_DTYPES = {"Bool": np.bool_, "Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16,
           "UInt16": np.uint16, "Int32": np.int32, "UInt32": np.uint32, "Int64": np.int64,
           "UInt64": np.uint64, "Float16": np.float16, "Float32": np.float32, "Float64": np.float64}
_DTYPES = {name: np.dtype(t) for name, t in _DTYPES.items()}


def bfloat16():
    """numpy's bfloat16 as MindSpore uses it (Tensor.asnumpy() of a BFloat16 tensor)."""
    try:
        from mindspore.common.np_dtype import bfloat16 as bf16
    except ImportError:
        from ml_dtypes import bfloat16 as bf16
    return np.dtype(bf16)


def tensor_type(dtype):
    """MindSpore's tensor_type name for a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "BFloat16"
    for name, t in _DTYPES.items():
        if t == dtype:
            return name
    raise InputError(f"no MindSpore checkpoint type for numpy dtype {dtype}")


def numpy_dtype(type_name):
    if type_name == "BFloat16":
        return bfloat16()
    try:
        return _DTYPES[type_name]
    except KeyError:
        raise CheckpointFormatError(f"unsupported tensor_type {type_name!r}") from None


class CheckpointFormatError(InputError):
    """A file that is not a (complete) MindSpore checkpoint."""


# -- writing --------------------------------------------------------------------------------------

def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, length):
    """Key and length prefix of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _record_head(tag, dims, type_name, content_len):
    """The bytes of one record up to its tensor_content."""
    tensor = b"".join(_varint(1 << 3) + _varint(d) for d in dims)
    tensor += _field(2, len(type_name)) + type_name + _field(3, content_len)
    value = _field(1, len(tag)) + tag + _field(2, len(tensor) + content_len) + tensor
    return _field(1, len(value) + content_len) + value


class CheckpointWriter:
    """Append tensors to a new .ckpt one at a time: `with CheckpointWriter(path) as w: w.add(n, a)`.

    Holds no tensor after add() returns. Names must be unique. The caller owns atomicity (write to a
    temporary path, see outputs.atomic_outputs). The file is hashed as it is written (digests).
    """

    def __init__(self, path, chunk_bytes=CHUNK_BYTES):
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.names = set()
        self._file = HashingFile(path)

    def add(self, name, array):
        if name in self.names:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        array = np.asarray(array)
        if array.size == 0:
            raise InputError(f"{self.path}: tensor {name!r} is empty; MindSpore cannot store it")
        self.names.add(name)
        type_name = tensor_type(array.dtype).encode()
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        step = max(self.chunk_bytes // array.itemsize, 1) * array.itemsize
        for start in range(0, len(data), step):
            chunk = data[start:start + step]
            self._file.write(_record_head(name.encode(), array.shape, type_name, len(chunk)))
            self._file.write(chunk)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_checkpoint(path, tensors):
    """Write an iterable of (name, array) to a .ckpt, one tensor at a time."""
    with CheckpointWriter(path) as writer:
        for name, array in tensors:
            writer.add(name, array)


# -- reading --------------------------------------------------------------------------------------

class _Reader:
    """Sequential reads with bounds checks against the end of the record data; with a `hasher`, every
    byte passes through it (skipped bytes are read, not seeked over)."""

    def __init__(self, f, end, path, hasher=None):
        self.f, self.pos, self.end, self.path, self.hasher = f, 0, end, path, hasher

    def need(self, n):
        if self.pos + n > self.end:
            raise CheckpointFormatError(f"{self.path}: truncated: {n} bytes needed at offset {self.pos}, "
                                        f"but the data ends at {self.end}")

    def read(self, n):
        self.need(n)
        self.pos += n
        data = self.f.read(n)
        if self.hasher:
            self.hasher.update(data)
        return data

    def read_into(self, view):
        self.need(len(view))
        if self.f.readinto(view) != len(view):
            raise CheckpointFormatError(f"{self.path}: short read at offset {self.pos}")
        if self.hasher:
            self.hasher.update(view)
        self.pos += len(view)

    def skip(self, n):
        self.need(n)
        if self.hasher:
            while n:
                chunk = self.f.read(min(n, _SKIP_CHUNK))
                self.hasher.update(chunk)
                n -= len(chunk)
                self.pos += len(chunk)
        else:
            self.f.seek(n, os.SEEK_CUR)
            self.pos += n

    def varint(self):
        shift = value = 0
        while True:
            byte = self.read(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise CheckpointFormatError(f"{self.path}: corrupt length at offset {self.pos}")


def _read_record_head(r):
    """Parse one record up to its tensor_content: (tag, dims, type_name, content_len, record_end)."""
    start = r.pos
    if r.varint() != 0x0A:
        raise CheckpointFormatError(f"{r.path}: not a MindSpore checkpoint record at offset {start}")
    record_end = r.varint() + r.pos
    r.need(record_end - r.pos)
    tag, dims, type_name = None, [], None
    while r.pos < record_end:
        key = r.varint()
        length = r.varint() if key & 7 == 2 else None
        if key == 0x0A:
            tag = r.read(length).decode("utf-8")
        elif key == 0x12:  # TensorProto
            tensor_end = r.pos + length
            while r.pos < tensor_end:
                k = r.varint()
                if k == 0x08:
                    dims.append(r.varint())
                elif k == 0x0A:  # packed dims
                    packed_end = r.varint() + r.pos
                    while r.pos < packed_end:
                        dims.append(r.varint())
                elif k == 0x12:
                    type_name = r.read(r.varint()).decode("ascii")
                elif k == 0x1A and tag is not None and type_name is not None:
                    return tag, dims, type_name, r.varint(), record_end
                else:
                    raise CheckpointFormatError(f"{r.path}: unexpected field {k:#x} in tensor {tag!r}")
        elif length is not None:
            r.skip(length)
        else:
            raise CheckpointFormatError(f"{r.path}: corrupt record at offset {start}")
    raise CheckpointFormatError(f"{r.path}: record {tag!r} at offset {start} has no tensor data")


def _data_end(f, size):
    """End of the record data: before the crc footer if the file has one."""
    if size >= CRC_FOOTER:
        f.seek(size - CRC_FOOTER)
        if f.read(len(CRC_MAGIC)) == CRC_MAGIC:
            return size - CRC_FOOTER
    return size


def iter_checkpoint(path, select=None, hashed=False):
    """Yield (name, numpy array) one tensor at a time, in file order.

    `select(name) -> bool` skips unwanted tensors without reading their bytes. Tensors split over
    several records are reassembled. A truncated or corrupt file raises CheckpointFormatError naming
    the file and the tensor. With `hashed`, the whole file is read and its sha256 remembered
    (lorapipe.digests) once the last tensor is yielded: the manifest need not read it again.
    """
    path = str(path)
    hasher = OverlappedHash() if hashed else None
    with open(path, "rb") as f:
        r = _Reader(f, _data_end(f, os.path.getsize(path)), path, hasher)
        if r.end == 0:
            raise CheckpointFormatError(f"{path}: empty file, not a MindSpore checkpoint")
        f.seek(0)
        current, filled, previous = None, 0, None
        while r.pos < r.end:
            tag, dims, type_name, length, record_end = _read_record_head(r)
            if current is not None and tag != current[0]:
                raise CheckpointFormatError(f"{path}: tensor {current[0]!r} is incomplete "
                                            f"({filled} of {current[1].nbytes} bytes)")
            if current is None and (tag == previous and length == 0 or select and not select(tag)):
                r.skip(record_end - r.pos)  # unwanted, or an empty trailing chunk MindSpore may write
                continue
            if type_name == "str":  # strings that save_checkpoint(append_dict=...) stores
                yield tag, r.read(length).decode("utf-32-le").rstrip("\x00")
                r.skip(record_end - r.pos)
                previous = tag
                continue
            if current is None:
                current = (tag, np.empty(dims, numpy_dtype(type_name)))
                filled = 0
            array = current[1]
            if filled + length > array.nbytes or list(array.shape) != dims:
                raise CheckpointFormatError(f"{path}: tensor {tag!r}: {filled + length} bytes do not fit "
                                            f"its shape {dims} of {type_name}")
            r.read_into(memoryview(array.reshape(-1).view(np.uint8))[filled:filled + length])
            filled += length
            r.skip(record_end - r.pos)
            if filled == array.nbytes:
                yield tag, array
                current, previous = None, tag
        if current is not None:
            raise CheckpointFormatError(f"{path}: truncated: tensor {current[0]!r} has {filled} of "
                                        f"{current[1].nbytes} bytes")
        if hasher:
            hasher.update(f.read())  # the crc footer, if any
            remember(path, hasher.hexdigest())


def checkpoint_index(path):
    """[(name, type_name, shape)] of a checkpoint, reading headers only (no tensor data). A missing file
    is an InputError naming it (a corrupt one raises its own)."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    index = []
    with open(path, "rb") as f:
        r = _Reader(f, _data_end(f, os.path.getsize(path)), path)
        f.seek(0)
        while r.pos < r.end:
            tag, dims, type_name, _, record_end = _read_record_head(r)
            if not index or index[-1][0] != tag:
                index.append((tag, type_name, tuple(dims)))
            r.skip(record_end - r.pos)
    return index
