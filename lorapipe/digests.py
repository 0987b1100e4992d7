"""sha256 of the files a step reads and writes, computed while the bytes pass through.

Not in a second pass: a 7B conversion would otherwise read 15 GB twice more just for its manifest.

Streaming writers write through HashingFile; streaming readers that read an input from start to end
hash it as they go. Both remember the digest for the file's identity (device, inode, size, mtime):
renaming a temporary output into place keeps all four, so the manifest (lorapipe.provenance) finds the
digest without reading the file again. No dependencies beyond the standard library.
"""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_CHUNK = 16 << 20
_known = {}  # (st_dev, st_ino) -> (size, mtime_ns, sha256 hex)


def remember(path, digest):
    """Record `digest` as the sha256 of the file at `path` as it is now."""
    st = os.stat(path)
    _known[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, digest)


def known(st):
    """The remembered sha256 for a file with stat result `st`, if its bytes are still those hashed."""
    entry = _known.get((st.st_dev, st.st_ino))
    return entry[2] if entry and entry[:2] == (st.st_size, st.st_mtime_ns) else None


def sha256_file(path, fresh=False):
    """The file's sha256: remembered, or (always with `fresh`) streamed through the hash."""
    digest = None if fresh else known(os.stat(path))
    if digest:
        return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    remember(path, h.hexdigest())
    return h.hexdigest()


class OverlappedHash:
    """sha256 computed on a thread of its own, so that hashing a chunk overlaps the I/O around it
    (hashlib releases the GIL for large buffers). A chunk must stay unchanged until wait() returns.
    Small chunks (record headers) are hashed at once: a thread hand-off would cost more."""

    def __init__(self):
        self._hash = hashlib.sha256()
        self._worker = ThreadPoolExecutor(max_workers=1)
        self._pending = None

    def update(self, data):
        self.wait()
        if len(data) < (1 << 20):
            self._hash.update(data)
        else:
            self._pending = self._worker.submit(self._hash.update, data)

    def wait(self):
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def hexdigest(self):
        self.wait()
        self._worker.shutdown()
        return self._hash.hexdigest()


class HashingFile:
    """A new file whose bytes are hashed as they are written (sequential writes only): each chunk is
    hashed while the write system call copies it. The digest is remembered when the file is closed."""

    def __init__(self, path):
        self.path = path
        self._file = open(path, "wb")
        self._hash = OverlappedHash()

    def write(self, data):
        self._hash.update(data)
        written = self._file.write(data)
        self._hash.wait()  # the caller may reuse `data` once write() returns
        return written

    def close(self):
        if not self._file.closed:
            self._file.close()
            remember(self.path, self._hash.hexdigest())


def copy_hashed(src, dst):
    """Copy a file, hashing the bytes on the way (the copy's digest is remembered)."""
    out = HashingFile(dst)
    try:
        with open(src, "rb") as f:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
    finally:
        out.close()


def copy_bytes(src, folder):
    """What link_or_copy writes for `src` into `folder`: nothing where `folder` (or the nearest of its parents
    that exists) is on `src`'s file system, else `src`'s size."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    st = os.stat(src)
    return 0 if os.stat(folder).st_dev == st.st_dev else st.st_size


def link_or_copy(src, dst):
    """`dst` as a hard link to `src` where the file system allows: no byte written, which for a 7B rank's
    checkpoint (14 GB) saves the copy's time and disk. Else a copy hashed on the way. For files that are
    never written in place: MindSpore writes a checkpoint to a new file and renames it, and lorapipe's
    outputs are replaced, not edited, so the link keeps the bytes it was made with."""
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        copy_hashed(src, dst)


class HashingReader:
    """Reads one file from start to end in one pass, hashing every byte, also those the caller skips;
    `read_into(offset, view)` must be called with increasing offsets. Remembers the digest on close."""

    def __init__(self, path):
        self.path = path
        self._file = open(path, "rb")
        self._hash = OverlappedHash()
        self._skip_buffer = bytearray(_CHUNK)
        self.position = 0

    def _hash_up_to(self, offset):
        view = memoryview(self._skip_buffer)
        while self.position < offset:
            self._hash.wait()  # the skip buffer is about to be refilled
            got = self._file.readinto(view[:min(_CHUNK, offset - self.position)])
            if not got:
                return
            self._hash.update(view[:got])
            self.position += got

    def read_into(self, offset, view):
        """Fill `view` from `offset` on; returns the number of bytes read (short at the end of file).
        The bytes are hashed on another thread while the caller uses them: `view` must stay unchanged
        until the next read_into() or close()."""
        if offset < self.position:
            raise ValueError(f"{self.path}: offset {offset} is behind the read position {self.position}")
        self._hash_up_to(offset)
        self._hash.wait()  # the caller may refill the previous view now
        got = self._file.readinto(view)
        self._hash.update(view[:got])
        self.position += got
        return got

    def close(self):
        """Hash the rest of the file, remember the digest and close."""
        if not self._file.closed:
            self._hash_up_to(os.fstat(self._file.fileno()).st_size)
            self._file.close()
            remember(self.path, self._hash.hexdigest())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._hash.hexdigest()  # let the hashing thread finish; the digest of a partial read is not kept
            self._file.close()
