"""The streaming .ckpt reader/writer against MindSpore's own save_checkpoint/load_checkpoint."""

import mindspore as ms
import numpy as np
import pytest

from lorapipe.formats.msckpt import (
    CheckpointFormatError,
    CheckpointWriter,
    bfloat16,
    checkpoint_index,
    iter_checkpoint,
    write_checkpoint,
)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "model.w": rng.standard_normal((7, 5)).astype(np.float32),
        "model.h": rng.standard_normal((3, 4)).astype(np.float16),
        "model.b": rng.standard_normal((6,)).astype(np.float32).astype(bfloat16()),
        "global_step": np.array(12, dtype=np.int32),
        "epoch_num": np.array([3], dtype=np.int64),
    }


def test_mindspore_loads_what_we_write(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "ours.ckpt"
    write_checkpoint(path, tensors.items())
    loaded = ms.load_checkpoint(str(path))
    assert list(loaded) == list(tensors)
    for name, array in tensors.items():
        assert same_bits(loaded[name].asnumpy(), array), name


def test_we_read_what_mindspore_writes(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "theirs.ckpt"
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in tensors.items()], str(path))
    got = dict(iter_checkpoint(path))
    assert list(got) == list(tensors)
    for name, array in tensors.items():
        assert same_bits(got[name], array), name
    assert checkpoint_index(path)[0] == ("model.w", "Float32", (7, 5))


def test_split_tensors_and_selection(tmp_path):
    big = np.arange(1000, dtype=np.float32).reshape(10, 100)
    path = tmp_path / "split.ckpt"
    with CheckpointWriter(path, chunk_bytes=1024) as w:  # 4 records for `big`, as MindSpore splits >512 MiB
        w.add("big", big)
        w.add("small", np.ones(3, np.float32))
    assert np.array_equal(ms.load_checkpoint(str(path))["big"].asnumpy(), big)
    assert np.array_equal(dict(iter_checkpoint(path))["big"], big)
    assert [n for n, _ in iter_checkpoint(path, select=lambda n: n != "big")] == ["small"]


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "t.ckpt"
    write_checkpoint(path, sample_tensors().items())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointFormatError, match=r"t\.ckpt: truncated"):
        list(iter_checkpoint(path))
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(CheckpointFormatError, match=r"t\.ckpt: not a MindSpore checkpoint record"):
        list(iter_checkpoint(path))
    path.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty file"):
        list(iter_checkpoint(path))


def test_duplicate_and_empty_tensors_refused(tmp_path):
    with CheckpointWriter(tmp_path / "d.ckpt") as w:
        w.add("a", np.ones(2, np.float32))
        with pytest.raises(ValueError, match="'a' written twice"):
            w.add("a", np.ones(2, np.float32))
        with pytest.raises(ValueError, match="'e' is empty"):
            w.add("e", np.ones(0, np.float32))


def test_streaming_reads_and_writes_hash_every_byte(tmp_path):
    """What provenance records without a second pass equals a fresh sha256 of the file."""
    import hashlib
    import os

    from lorapipe import digests
    from lorapipe.formats.msckpt import CheckpointWriter, iter_checkpoint

    path = tmp_path / "x.ckpt"
    with CheckpointWriter(path, chunk_bytes=1 << 20) as writer:  # chunked records, big and small tensors
        writer.add("big", np.arange(600_000, dtype=np.float32))
        writer.add("small", np.ones(3, np.int32))
        writer.add("skipped", np.zeros((700, 500), np.float16))
    fresh = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digests.known(os.stat(path)) == fresh  # written through the hash
    digests._known.clear()  # as in the next process
    assert [name for name, _ in iter_checkpoint(path, select=lambda n: n != "skipped", hashed=True)] == ["big", "small"]
    assert digests.known(os.stat(path)) == fresh  # read through the hash, skipped bytes included
