"""HF checkpoint files read and written one tensor at a time: torch zip, safetensors, shards.

HF checkpoint files, read and written one tensor at a time: torch's zip format (pytorch_model.bin)
and safetensors, single files or sharded with an *.index.json.

Both formats store each tensor as a contiguous run of raw bytes, so we parse the index (the pickle, or
the safetensors JSON header) and read one tensor's bytes at a time into a numpy array; writers take a
plan of (name, dtype, shape) first and then the tensors in that order. Peak memory is about two tensors
whatever the model size, and mapped pages never pile up in the resident set.

Why hand-written readers (benchmarks/convert.py --true-7b: Baichuan2-7B widths, 2 layers, bf16, 2.87 GB,
best of 3 on the 2-core reference machine): torch.load(mmap=True, weights_only=True) converted in
5.2 s and safetensors' safe_open in 4.4 s against 6.1 s here, but both peaked at 3.3 GB resident (the
mapped file) against 1.4 GB (two tensors). Memory decides: a 15 GB model, or a 90 GB checkpoint with
optimizer state, on a 24 GB machine. Reading each file once in order also lets the conversion hash its
input on the way (read_in_file_order), which the library readers' random access would not.
"""

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorapipe.digests import HashingFile, HashingReader
from lorapipe.errors import InputError
from lorapipe.formats.msckpt import bfloat16


@dataclass
class TensorRef:
    """Where one tensor's bytes lie: `nbytes` at `offset` of `path`, as `dtype` with `shape`."""
    name: str
    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self):
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def read(self):
        """The tensor as a numpy array (random access; a whole file in order is read_in_file_order's)."""
        view = memoryview(bytearray(self.nbytes))
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            got = f.readinto(view)
        if got != self.nbytes:
            raise InputError(f"{self.path}: truncated: tensor {self.name!r} needs {self.nbytes} bytes "
                             f"at offset {self.offset}, the file has {got}")
        return np.frombuffer(view, self.dtype).reshape(self.shape)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_refs(path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: truncated: not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise InputError(f"{path}: truncated or not a safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise InputError(f"{path}: corrupt safetensors header") from None
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = bfloat16() if info["dtype"] == "BF16" else np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r}: its header entry is not a safetensors tensor "
                             f"(dtype, shape, data_offsets): {info!r}") from None
        ref = TensorRef(name, path, 8 + header_len + start, dtype, shape)
        if not 0 <= start <= end or end - start != ref.nbytes:
            raise InputError(f"{path}: tensor {name!r}: the header's data_offsets [{start}, {end}] do not hold its "
                             f"shape {list(shape)} of {info['dtype']} ({ref.nbytes} bytes)")
        if 8 + header_len + end > size:
            raise InputError(f"{path}: truncated: tensor {name!r} ends at byte {8 + header_len + end}, "
                             f"the file has {size}")
        refs.append(ref)
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in refs)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise InputError(f"{path}: the header's data_offsets of {first!r} and {second!r} overlap")
    return refs


_TORCH_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _TorchIndexUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint's data.pkl into (storage, offset, shape) records, reading no
    tensor data. Only the globals a plain state dict needs are allowed, so this is as safe as
    torch.load(weights_only=True)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name == "BFloat16Storage":
            return bfloat16()
        if module == "torch" and name in _TORCH_STORAGES:
            return np.dtype(_TORCH_STORAGES[name])
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict (was a whole model object "
                                     f"saved, torch.save(model) instead of torch.save(model.state_dict())?)")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid  # ('storage', dtype, key, location, numel)
        return key, dtype

    @staticmethod
    def rebuild_tensor(storage, storage_offset, size, stride, *_):
        key, dtype = storage
        shape = tuple(size)
        contiguous = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        if shape and tuple(stride) != contiguous:
            raise pickle.UnpicklingError(f"a tensor is stored non-contiguously (stride {tuple(stride)})")
        return key, dtype, storage_offset * dtype.itemsize, shape


def _torch_zip_refs(path):
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError(f"{path}: truncated, or not a torch zip checkpoint (torch.save since 1.6); "
                         f"the zip directory at its end is missing") from None
    with archive, open(path, "rb") as raw:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise InputError(f"{path}: no data.pkl inside; not a torch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        members = {}
        for info in archive.infolist():
            if info.filename.startswith(prefix + "data/"):
                if info.compress_type != zipfile.ZIP_STORED:
                    raise InputError(f"{path}: {info.filename} is compressed; torch never compresses tensors")
                raw.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", raw.read(4))
                members[info.filename[len(prefix + "data/"):]] = (
                    info.header_offset + 30 + name_len + extra_len, info.file_size)
        with archive.open(pkl) as f:
            try:
                state = _TorchIndexUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, ValueError) as e:
                raise InputError(f"{path}: cannot read its tensor index: {e}") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, expected a state dict")
    refs = []
    for name, (key, dtype, offset, shape) in state.items():
        start, size = members[key]
        ref = TensorRef(name, path, start + offset, dtype, shape)
        if offset + ref.nbytes > size:
            raise InputError(f"{path}: tensor {name!r} overruns its storage")
        refs.append(ref)
    return refs


def _refs_of_file(path):
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_refs(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _torch_zip_refs(path)
    raise InputError(f"{path}: unknown weights format (expected .bin, .safetensors, or an "
                     f"*.index.json of shards)")


def weight_files(source):
    """The weight files of an HF source: a file, an *.index.json of shards, or a model directory."""
    source = Path(source)
    if source.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                     "pytorch_model.bin"):
            if (source / name).is_file():
                return weight_files(source / name)
        raise InputError(f"{source}: no model.safetensors, pytorch_model.bin or *.index.json in it")
    if not source.is_file():
        raise InputError(f"{source}: no such file")
    if source.name.endswith(".index.json"):
        try:
            weight_map = json.loads(source.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise InputError(f"{source}: not a sharded-checkpoint index (no weight_map)") from None
        shards = [source.parent / f for f in dict.fromkeys(weight_map.values())]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise InputError(f"{source}: names {len(shards)} shards, and {', '.join(missing)} is not in "
                             f"{source.parent}")
        return shards
    return [source]


def tensor_refs(source):
    """TensorRefs of every tensor of an HF source, in file order (reads headers only)."""
    refs = {}
    for path in weight_files(source):
        for ref in _refs_of_file(path):
            if ref.name in refs:
                raise InputError(f"{path}: tensor {ref.name!r} also appears in {refs[ref.name].path}")
            refs[ref.name] = ref
    return list(refs.values())


def read_in_file_order(refs, buffer):
    """Yield (ref, array) for every ref, each file read once from start to end in offset order and
    hashed on the way (lorapipe.digests), so that the manifest need not read the input again. Each
    array lives in `buffer` (a bytearray as large as the largest tensor) until the next one is read."""
    by_file = {}
    for ref in refs:
        by_file.setdefault(ref.path, []).append(ref)
    for path, file_refs in by_file.items():
        with HashingReader(path) as reader:
            for ref in sorted(file_refs, key=lambda r: r.offset):
                view = memoryview(buffer)[:ref.nbytes]
                got = reader.read_into(ref.offset, view)
                if got != ref.nbytes:
                    raise InputError(f"{path}: truncated: tensor {ref.name!r} needs {ref.nbytes} bytes at offset "
                                     f"{ref.offset}, the file has {got}")
                yield ref, np.frombuffer(view, ref.dtype).reshape(ref.shape)


def read_json(path, what="file"):
    """A JSON file's content; one InputError naming the file when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def find_config(source):
    """config.json beside an HF source."""
    source = Path(source)
    return read_json((source if source.is_dir() else source.parent) / "config.json",
                     "config.json (needed to check the tensor shapes)")


_SAFETENSORS_NAMES = {np.dtype(t): n for n, t in _SAFETENSORS_DTYPES.items()}
_STORAGE_NAMES = {np.dtype(t): n for n, t in _TORCH_STORAGES.items()}


def _dtype_name(dtype, names, bf16_name):
    return bf16_name if dtype.name == "bfloat16" else names[np.dtype(dtype)]


class SafetensorsWriter:
    """Write a .safetensors file tensor by tensor; the full plan [(name, dtype, shape)] comes first,
    because the format's JSON header holds every offset."""

    def __init__(self, path, plan):
        header, offset = {}, 0
        for name, dtype, shape in plan:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": _dtype_name(dtype, _SAFETENSORS_NAMES, "BF16"), "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.order = [name for name, _, _ in plan]
        self.file = HashingFile(path)
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def add(self, name, array):
        if not self.order or self.order[0] != name:
            raise ValueError(f"safetensors plan expects {self.order[:1]}, got {name!r}")
        self.order.pop(0)
        self.file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))

    def close(self):
        self.file.close()


class _Storage:
    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles exactly like a contiguous CPU torch.Tensor whose bytes live in storage `key`."""

    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        import torch._utils

        stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, OrderedDict())


class _StatePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            import torch

            storage = getattr(torch, _dtype_name(obj.dtype, _STORAGE_NAMES, "BFloat16Storage"))
            return "storage", storage, obj.key, "cpu", obj.numel
        return None


class TorchZipWriter:
    """Write a pytorch_model.bin (torch.save's zip format) tensor by tensor from a plan, so that
    torch.load reads it as a state dict; one tensor in memory at a time."""

    def __init__(self, path, plan, root="pytorch_model"):
        import io

        self.root, self.order = root, [name for name, _, _ in plan]
        state = OrderedDict((name, _TensorStub(_Storage(str(i), dtype, int(np.prod(shape))), shape))
                            for i, (name, dtype, shape) in enumerate(plan))
        self.keys = {name: str(i) for i, (name, _, _) in enumerate(plan)}
        pkl = io.BytesIO()
        _StatePickler(pkl, protocol=2).dump(state)
        self.zip = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED)
        self.zip.writestr(zipfile.ZipInfo(f"{root}/data.pkl"), pkl.getvalue())
        self.zip.writestr(zipfile.ZipInfo(f"{root}/byteorder"), "little")

    def add(self, name, array):
        if not self.order or self.order[0] != name:
            raise ValueError(f"torch zip plan expects {self.order[:1]}, got {name!r}")
        self.order.pop(0)
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        info = zipfile.ZipInfo(f"{self.root}/data/{self.keys[name]}")
        info.file_size = len(data)
        with self.zip.open(info, "w", force_zip64=len(data) > zipfile.ZIP64_LIMIT) as f:
            f.write(data)

    def close(self):
        # ZipInfo entries, never bare names: writestr(name) stamps the current time into the archive,
        # and the export would differ from run to run
        self.zip.writestr(zipfile.ZipInfo(f"{self.root}/version"), "3\n")
        self.zip.close()
