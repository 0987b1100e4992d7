"""GGUF writing, a tensor at a time: storage types, bytes converted in row chunks, hashed output.

The GGML type each tensor is stored as follows convert_hf_to_gguf.py's choices, and every byte the
GGUFWriter writes is hashed on the way."""

import numpy as np

from lorapipe.digests import HashingFile

TYPES = ("f32", "f16", "q8_0")  # the file types export_gguf writes, by their file-name suffix


# Rows converted at once: bounds the float32 temporaries of a large tensor (7B's embedding is 125696 rows).
CHUNK_ELEMENTS = 1 << 24


def gguf_package():
    import gguf  # envs/requirements.txt pins it; imported here so that lorapipe imports without it

    return gguf


def storage_type(name, shape, file_type):
    """The GGML type a tensor is stored as in a file of `file_type` ("f32" | "f16" | "q8_0"), as
    convert_hf_to_gguf.py chooses: 1-D and *_norm tensors f32; else the file's type, except that a row
    length q8_0 cannot block (not a multiple of 32) falls back to f16."""
    gguf = gguf_package()
    q = gguf.GGMLQuantizationType
    if file_type == "f32" or len(shape) <= 1 or name.endswith("_norm.weight"):
        return q.F32
    if file_type == "f16":
        return q.F16
    if file_type == "q8_0":
        block, _ = gguf.GGML_QUANT_SIZES[q.Q8_0]
        return q.Q8_0 if shape[-1] % block == 0 else q.F16
    raise ValueError(f"GGUF file type {file_type!r}: expected one of {', '.join(TYPES)}")


def stored_nbytes(shape, qtype):
    gguf = gguf_package()
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


def encode(array, qtype, transform=None):
    """The bytes `array` is stored as in GGML type `qtype` (an array of that dtype, or uint8 blocks for a
    quantised type), converted through float32 in chunks of rows; `transform` applies to each float32
    chunk first (it must work row by row: the NormHead)."""
    gguf = gguf_package()
    q = gguf.GGMLQuantizationType
    rows = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(1, -1)
    floats = {q.F32: np.float32, q.F16: np.float16}
    out = np.empty(rows.shape, floats[qtype]) if qtype in floats else \
        np.empty(gguf.quant_shape_to_byte_shape(rows.shape, qtype), np.uint8)
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].astype(np.float32)
        if transform is not None:
            chunk = transform(chunk)
        out[start:start + step] = gguf.quants.quantize(chunk, qtype)
    return out


class _HashedOutput:
    """The file GGUFWriter writes to: every byte passes through a HashingFile, so the manifest need not
    read the file again."""

    def __init__(self, path):
        self._file, self._written = HashingFile(path), 0

    def write(self, data):
        view = memoryview(data).cast("B")
        self._file.write(view)
        self._written += len(view)
        return len(view)

    def tell(self):
        return self._written

    def flush(self):
        pass

    def close(self):
        self._file.close()


class Stored(np.ndarray):
    """A tensor's stored bytes as write_tensor_data takes them. It writes with `tensor.tofile(fout)`, and
    numpy's tofile goes to the file descriptor, past the hash: this array writes through fout.write."""

    def tofile(self, fout, *args, **kwargs):
        fout.write(np.ascontiguousarray(self.view(np.ndarray)).reshape(-1).view(np.uint8))


def writer_class():
    gguf = gguf_package()

    class Writer(gguf.GGUFWriter):
        """GGUFWriter writing one file through _HashedOutput (the package opens a plain file)."""

        def open_output_file(self, path=None):
            if self.state is gguf.WriterState.NO_FILE:
                self.fout = [_HashedOutput(self.path)]
                self.state = gguf.WriterState.EMPTY

    return Writer
