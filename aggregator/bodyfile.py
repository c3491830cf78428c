"""A storage node's block bodies: one append-only file of framed records, written a
group at a time with one fdatasync per group.

    record = "GLB1" | payload length (u32) | height (u64) | CRC32 (u32) | payload
    payload = the body's transfer bytes (`storagewire.encode_body`: count, then length + bytes per tx)

The CRC covers the height and the payload, so a record read at the wrong place, a
torn one or one with a flipped byte reads as nothing (`read` returns None), never as
data. The file knows nothing of which records count: `storagestore` keeps the index
(height -> offset, length) in SQLite and commits it only after `append` returned,
i.e. after the fdatasync of the bytes it points to; the record heads are the
index's durable copy (`scan`). One writer per file, held by an
exclusive `flock`, so a second process (or a read-only CLI) can never cut the tail
the writer is appending to.
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

__all__ = ["BodyFile", "BodyFileLocked", "HEAD", "MAGIC", "frame_head"]

MAGIC = b"GLB1"
HEAD = struct.Struct(">4sIQI")   # magic, payload length, height, CRC32: 20 bytes
_HEIGHT = struct.Struct(">Q")
# Buffers per pwritev call: Linux's IOV_MAX is 1024; a group of bodies is two buffers each.
_IOV = 1000


class BodyFileLocked(Exception):
    """Another writer holds the body file."""


def frame_head(height: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(_HEIGHT.pack(height)))
    return HEAD.pack(MAGIC, len(payload), height, crc)


class BodyFile:
    def __init__(self, path: Path | str, *, writer: bool):
        self.path = Path(path)
        self.writer = writer
        if writer:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise BodyFileLocked(f"{self.path} has a writer already") from None
        else:
            # A reader may open before the writer ever created the file: then it reads nothing.
            self.fd = os.open(self.path, os.O_RDONLY) if self.path.exists() else -1
        self.end = self.size()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)   # releases the flock
            self.fd = -1

    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.fd >= 0 else 0

    def _reopen(self) -> bool:
        if self.fd < 0 and self.path.exists():
            self.fd = os.open(self.path, os.O_RDONLY)
        return self.fd >= 0

    # -- the writer ------------------------------------------------------------------
    def append(self, records: Sequence[tuple[int, bytes]]) -> list[int]:
        """Write (height, payload) records at the end, then fdatasync once; the offset
        of each record. Only after this returns may an index point at them."""
        assert self.writer, "a read-only body file"
        buffers, offsets, at = [], [], self.end
        for height, payload in records:
            offsets.append(at)
            buffers += (frame_head(height, payload), payload)
            at += HEAD.size + len(payload)
        pos = self.end
        for k in range(0, len(buffers), _IOV):
            part = buffers[k:k + _IOV]
            want = sum(map(len, part))
            done = os.pwritev(self.fd, part, pos)
            if done != want:   # a short write (disk full): finish it the slow way or fail
                rest = b"".join(bytes(b) for b in part)[done:]
                while rest:
                    n = os.pwrite(self.fd, rest, pos + done)
                    if n <= 0:
                        raise OSError("short write to the body file")
                    rest, done = rest[n:], done + n
            pos += want
        os.fdatasync(self.fd)
        self.end = at
        return offsets

    def truncate(self, end: int) -> None:
        """Cut the file at `end` (bytes no index points at: a torn or uncommitted tail)."""
        assert self.writer, "a read-only body file"
        if self.size() != end:
            os.ftruncate(self.fd, end)
            os.fdatasync(self.fd)
        self.end = end

    # -- reading ---------------------------------------------------------------------
    def read(self, offset: int, length: int, height: int) -> bytes | None:
        """The payload of the record at `offset` if it is whole, of `height`, `length`
        bytes long and its CRC holds; None otherwise (torn, flipped, not there)."""
        if not self._reopen():
            return None
        raw = os.pread(self.fd, HEAD.size + length, offset)
        if len(raw) != HEAD.size + length:
            return None
        magic, n, h, crc = HEAD.unpack_from(raw, 0)
        payload = memoryview(raw)[HEAD.size:]
        if magic != MAGIC or n != length or h != height or zlib.crc32(payload, zlib.crc32(_HEIGHT.pack(h))) != crc:
            return None
        return raw[HEAD.size:]

    def scan(self, offset: int):
        """(offset, height, payload) of each whole, valid record from `offset` on, up to
        the first that is not (a torn tail ends the file: records are only appended)."""
        size = self.size()
        while offset + HEAD.size <= size:
            magic, length, height, _ = HEAD.unpack(os.pread(self.fd, HEAD.size, offset))
            payload = self.read(offset, length, height) if magic == MAGIC else None
            if payload is None:
                return
            yield offset, height, payload
            offset += HEAD.size + length

    def pread(self, offset: int, length: int) -> bytes:
        """Raw bytes (one transaction of a record, say); the caller checks them."""
        if not self._reopen():
            return b""
        return os.pread(self.fd, length, offset)
