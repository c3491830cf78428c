"""A storage node's store: certified headers, the bodies it keeps, its placements.

Headers, placements and the body index live in SQLite; the bodies themselves in one
append-only record file beside it (`bodyfile`, `{database}-bodies`). Keeping a group
of bodies is: append their records, fdatasync, then commit their index rows (height
-> offset, length, header hash, transaction offsets, leaf hashes) in one SQLite
transaction. So the index never points at bytes that are not durable, each body is
whole or absent, and a torn or uncommitted tail (kill -9, power loss) is cut off when
the writer opens the store. A record that fails its CRC, or a transaction whose leaf
hash is not the indexed one, reads as missing: its index row is dropped (so the body
is fetched again) and `corrupt` counts it.

Databases of the earlier layout (every transaction a row of `storage_txs`) are
migrated when the writer opens them, a batch of bodies per fsync + commit.
The store trusts its callers to have run `admission`; it refuses only what would
contradict what it already holds (a second header at a height).
"""

from __future__ import annotations

import json
import sqlite3
import struct
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from certlog import merkle
from certlog.block import Certificate, ChainError, Header
from certlog.store import connect, immediate

from .bodyfile import HEAD, BodyFile
from .storagewire import decode_body, encode_body

__all__ = ["StorageStore", "body_file_path"]

MIGRATE_BATCH = 64   # old-layout bodies moved per fsync + commit
_INDEX_COLUMNS = (("off", "INTEGER"), ("len", "INTEGER"), ("hash", "TEXT"), ("toffs", "BLOB"), ("leaves", "BLOB"))


_INSERT_BODY = ("INSERT INTO storage_bodies(height, txs, bytes, at, off, len, hash, toffs, leaves) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def body_file_path(database: Path | str) -> Path:
    return Path(f"{database}-bodies")


def _tx_offsets(txs: Sequence[bytes]) -> bytes:
    """Where each transaction's bytes start in the transfer encoding (after its length)."""
    offs, at = [], 4
    for t in txs:
        at += 4
        offs.append(at)
        at += len(t)
    return struct.pack(f">{len(offs)}I", *offs)


class StorageStore:
    """`writer`: the one store of a node that writes bodies (it holds the body file's
    lock, cuts its tail and migrates on open); the others only read (and drop the index
    row of a body they find corrupt)."""

    def __init__(self, path: Path | str | None = None, *, conn: sqlite3.Connection | None = None,
                 writer: bool | None = None):
        self.conn = conn if conn is not None else connect(path)
        writer = conn is None if writer is None else writer
        if path is None:   # a connection handed over (the CLI's read-only one): its file
            path = next(r[2] for r in self.conn.execute("PRAGMA database_list") if r[1] == "main")
        self.counts: Counter[str] = Counter()
        if writer:
            self.conn.executescript("""
                CREATE TABLE IF NOT EXISTS storage_headers (
                    height INTEGER PRIMARY KEY, hash TEXT NOT NULL, header BLOB NOT NULL, cert BLOB NOT NULL,
                    at REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS storage_bodies (
                    height INTEGER PRIMARY KEY, txs INTEGER NOT NULL, bytes INTEGER NOT NULL, at REAL NOT NULL,
                    off INTEGER, len INTEGER, hash TEXT, toffs BLOB, leaves BLOB);
                CREATE TABLE IF NOT EXISTS storage_placements (
                    height INTEGER PRIMARY KEY, by TEXT NOT NULL, at REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS storage_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            """)
            have = {r[1] for r in self.conn.execute("PRAGMA table_info(storage_bodies)")}
            for name, kind in _INDEX_COLUMNS:   # a database of the earlier layout
                if name not in have:
                    self.conn.execute(f"ALTER TABLE storage_bodies ADD COLUMN {name} {kind}")
        self.bodies = BodyFile(body_file_path(path), writer=writer)
        if writer:
            self._recover()
            self._migrate()

    def _recover(self) -> None:
        """Make the index and the file agree: drop index rows whose record is not wholly
        in the file (only a lying disk or a hand-cut file does that); index again the
        whole, valid records after the last indexed one whose body is the held certified
        header's (an index commit lost with the power: it is not fsynced on its own, the
        records are); cut the rest of the tail (torn, or never committed)."""
        size = self.bodies.size()
        rows = self.conn.execute("SELECT height, off + ? + len FROM storage_bodies WHERE off IS NOT NULL",
                                 (HEAD.size,)).fetchall()
        short = [h for h, end in rows if end > size]
        if short:
            self.counts["torn"] += len(short)
            with immediate(self.conn):
                self.conn.executemany("DELETE FROM storage_bodies WHERE height = ?", [(h,) for h in short])
        end = max((end for _, end in rows if end <= size), default=0)
        again = []
        for off, height, payload in self.bodies.scan(end):
            end = off + HEAD.size + len(payload)
            held = self.header(height)
            try:
                txs = decode_body(payload, views=True)
            except ChainError:
                continue
            leaves = merkle.leaf_hashes(txs)
            if (held is not None and held[0].txs == len(txs) and merkle.root_of_leaves(leaves) == held[0].tx_root
                    and not self.has_body(height)):
                again.append((height, len(txs), sum(map(len, txs)), time.time(), off, len(payload), held[0].hash,
                              _tx_offsets(txs), b"".join(leaves)))
        if again:
            self.counts["reindexed"] += len(again)
            with immediate(self.conn):
                self.conn.executemany(_INSERT_BODY, again)
        self.bodies.truncate(end)

    def close(self) -> None:
        self.conn.close()
        self.bodies.close()

    def _migrate(self) -> None:
        """Bodies of the earlier layout (rows of `storage_txs`) into the body file, a batch
        per fsync + commit; a crash half-way leaves the rest to the next open."""
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'storage_txs'").fetchone() is None:
            return
        while todo := [r[0] for r in self.conn.execute(
                "SELECT height FROM storage_bodies WHERE off IS NULL ORDER BY height LIMIT ?", (MIGRATE_BATCH,))]:
            bodies = []
            for h in todo:
                txs = [r[0] for r in self.conn.execute("SELECT data FROM storage_txs WHERE height = ? ORDER BY idx",
                                                       (h,))]
                row = self.conn.execute("SELECT hash FROM storage_headers WHERE height = ?", (h,)).fetchone()
                bodies.append((h, row[0] if row else "", txs))
            raws = [encode_body(txs) for _, _, txs in bodies]
            offsets = self.bodies.append([(h, raw) for (h, _, _), raw in zip(bodies, raws)])
            with immediate(self.conn):
                for (h, header_hash, txs), raw, off in zip(bodies, raws, offsets):
                    self.conn.execute("UPDATE storage_bodies SET off = ?, len = ?, hash = ?, toffs = ?, leaves = ? "
                                      "WHERE height = ?", (off, len(raw), header_hash, _tx_offsets(txs),
                                                           b"".join(merkle.leaf_hashes(txs)), h))
                self.conn.execute(f"DELETE FROM storage_txs WHERE height IN ({','.join('?' * len(todo))})", todo)
            self.counts["migrated"] += len(todo)
        with immediate(self.conn):
            self.conn.execute("DROP TABLE storage_txs")

    def _write(self, sql_params: Iterable[tuple[str, Sequence]]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in sql_params:
                c.execute(sql, params)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    # -- headers ------------------------------------------------------------------
    def put_header(self, header: Header, cert: Certificate) -> bool:
        """Keep a certified header; False if it was already held. A different header
        at the same height (only possible with f+1 faulty validators) is refused."""
        row = self.conn.execute("SELECT hash FROM storage_headers WHERE height = ?", (header.height,)).fetchone()
        if row is not None:
            if row[0] != header.hash:
                raise ChainError("conflicting_header", f"holding {row[0][:16]}… at {header.height}",
                                 height=header.height)
            return False
        self._write([("INSERT INTO storage_headers(height, hash, header, cert, at) VALUES (?, ?, ?, ?, ?)",
                      (header.height, header.hash, header.encode(), cert.encode(), time.time()))])
        return True

    def header(self, height: int) -> tuple[Header, Certificate] | None:
        row = self.conn.execute("SELECT header, cert FROM storage_headers WHERE height = ?", (height,)).fetchone()
        return None if row is None else (Header.decode(row[0]), Certificate.from_dict(json.loads(row[1])))

    def header_hashes(self, heights: Sequence[int]) -> dict[int, str]:
        """The held certified header's hash at each of `heights` that has one."""
        out: dict[int, str] = {}
        for k in range(0, len(heights), 500):   # SQLite's bound-parameter limit
            part = list(heights[k:k + 500])
            out.update(self.conn.execute(f"SELECT height, hash FROM storage_headers WHERE height IN "
                                         f"({','.join('?' * len(part))})", part).fetchall())
        return out

    def raw_headers(self, lo: int, hi: int) -> list[tuple[bytes, bytes]]:
        return self.conn.execute("SELECT header, cert FROM storage_headers WHERE height BETWEEN ? AND ? "
                                 "ORDER BY height", (lo, hi)).fetchall()

    def header_height(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(height), 0) FROM storage_headers").fetchone()[0]

    def missing_headers(self, upto: int, limit: int = 100_000) -> list[int]:
        """Heights in 1..upto with no header held (lowest first)."""
        have = {r[0] for r in self.conn.execute("SELECT height FROM storage_headers WHERE height <= ?", (upto,))}
        return [h for h in range(1, upto + 1) if h not in have][:limit]

    # -- bodies -------------------------------------------------------------------
    def put_body(self, header: Header, txs: Sequence[bytes]) -> bool:
        """Keep a body (checked against `header` by the caller); False if already held."""
        return bool(self.put_bodies([(header, txs)]))

    def put_bodies(self, bodies: Sequence) -> list[int]:
        """Keep several bodies ((header, txs) pairs or `AdmittedBody`s) with one fdatasync
        of their records and then one index commit: all of them or none, each whole or
        absent. Returns the heights newly kept."""
        held = set(self._held_bodies([b[0].height for b in bodies]))
        records, rows, now = [], [], time.time()
        for b in bodies:
            header, txs = b[0], b[1]
            h = header.height
            if h in held:
                continue
            held.add(h)
            raw = getattr(b, "raw", None) or encode_body(txs)
            leaves = getattr(b, "leaves", None) or merkle.leaf_hashes(txs)
            records.append((h, raw))
            rows.append([h, len(txs), sum(map(len, txs)), now, None, len(raw), header.hash, _tx_offsets(txs),
                         b"".join(leaves)])
        if not rows:
            return []
        start = self.bodies.end
        for row, off in zip(rows, self.bodies.append(records)):   # durable before any row points at it
            row[4] = off
        # Not fsynced on its own: the records just fsynced carry height, length and CRC,
        # and `_recover` indexes them again if a power cut takes this commit. One fsync
        # per group instead of two.
        try:
            with self._unsynced(), immediate(self.conn):
                self.conn.executemany(_INSERT_BODY, rows)
        except BaseException:
            self.bodies.truncate(start)   # nothing points at them: the file as it was
            raise
        return [r[0] for r in rows]

    @contextmanager
    def _unsynced(self) -> Iterator[None]:
        """Commits inside are durable at the next synced commit or checkpoint, not at once
        (synchronous=NORMAL): for what is kept durably elsewhere."""
        self.conn.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self.conn.execute("PRAGMA synchronous=FULL")

    def _held_bodies(self, heights: Sequence[int]) -> list[int]:
        out: list[int] = []
        for k in range(0, len(heights), 500):   # SQLite's bound-parameter limit
            part = list(heights[k:k + 500])
            out += [r[0] for r in self.conn.execute(
                f"SELECT height FROM storage_bodies WHERE height IN ({','.join('?' * len(part))})", part)]
        return out

    def has_body(self, height: int) -> bool:
        return self.conn.execute("SELECT 1 FROM storage_bodies WHERE height = ?", (height,)).fetchone() is not None

    def body_bytes(self, height: int) -> bytes | None:
        """The body's transfer bytes as kept (CRC checked); None if not held or corrupt."""
        row = self.conn.execute("SELECT off, len FROM storage_bodies WHERE height = ?", (height,)).fetchone()
        if row is None:
            return None
        data = self.bodies.read(row[0], row[1], height)
        if data is None:
            self.forget_corrupt(height, row[0])
        return data

    def body(self, height: int) -> list[bytes] | None:
        data = self.body_bytes(height)
        return None if data is None else decode_body(data)

    def tx(self, height: int, index: int) -> bytes | None:
        proof = self.tx_proof(height, index)
        return None if proof is None else proof[0]

    def tx_count(self, height: int) -> int | None:
        row = self.conn.execute("SELECT txs FROM storage_bodies WHERE height = ?", (height,)).fetchone()
        return None if row is None else row[0]

    def tx_proof(self, height: int, index: int) -> tuple[bytes, list[str]] | None:
        """Transaction `index` (one pread) and its Merkle path (from the indexed leaf
        hashes); None if not held, no such index, or the bytes read are not the leaf."""
        row = self.conn.execute("SELECT off, len, txs, toffs, leaves FROM storage_bodies WHERE height = ?",
                                (height,)).fetchone()
        if row is None or not 0 <= index < row[2]:
            return None
        off, size, n, toffs, leaves = row
        start = struct.unpack_from(">I", toffs, 4 * index)[0]
        end = struct.unpack_from(">I", toffs, 4 * (index + 1))[0] - 4 if index + 1 < n else size
        tx = self.bodies.pread(off + HEAD.size + start, end - start)
        leaf = leaves[32 * index:32 * index + 32]
        if len(tx) != end - start or merkle.leaf_hash(tx) != leaf:
            self.forget_corrupt(height, off)
            return None
        return tx, merkle.path_of_leaves([leaves[k:k + 32] for k in range(0, 32 * n, 32)], index)

    def forget_corrupt(self, height: int, off: int | None) -> None:
        """A body that does not read back as written is not held: drop its index row (the
        node fetches it again), unless it was replaced meanwhile (`off`: the record read)."""
        self.counts["corrupt"] += 1
        try:
            with immediate(self.conn):
                self.conn.execute("DELETE FROM storage_bodies WHERE height = ? AND (? IS NULL OR off = ?)",
                                  (height, off, off))
        except sqlite3.OperationalError:   # a read-only connection (the CLI): reading it as missing is enough
            pass

    def first_missing_body(self) -> int:
        """The lowest height >= 1 whose body is not held."""
        return self.conn.execute(
            "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM storage_bodies WHERE height = 1) THEN 1 ELSE "
            "(SELECT MIN(height) + 1 FROM storage_bodies b WHERE NOT EXISTS "
            "(SELECT 1 FROM storage_bodies c WHERE c.height = b.height + 1)) END").fetchone()[0]

    def used_bytes(self) -> int:
        """Bytes of the bodies held (their transfer encoding): what CP's report counts."""
        return self.conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM storage_bodies").fetchone()[0]

    def body_heights(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT height FROM storage_bodies ORDER BY height")]

    def body_ranges(self, after: int = 0, limit: int = 1024) -> list[tuple[int, int]]:
        """Held bodies as inclusive ranges [lo, hi] starting above `after` (gaps and islands)."""
        rows = self.conn.execute(
            "SELECT MIN(height), MAX(height) FROM (SELECT height, height - ROW_NUMBER() OVER (ORDER BY height) "
            "AS island FROM storage_bodies WHERE height > ?) GROUP BY island ORDER BY 1 LIMIT ?", (after, limit))
        return [(lo, hi) for lo, hi in rows]

    # -- the node's kind, as the verifier last set it (a promotion outlives a restart) --------
    def kind(self) -> str | None:
        row = self.conn.execute("SELECT value FROM storage_meta WHERE key = 'kind'").fetchone()
        return None if row is None else row[0]

    def set_kind(self, kind: str) -> None:
        self._write([("INSERT OR REPLACE INTO storage_meta(key, value) VALUES ('kind', ?)", (kind,))])

    # -- placements ----------------------------------------------------------------
    def place(self, heights: Iterable[int], by: str) -> None:
        """Record placements. Ones already recorded (the verifier re-sends a placement until
        it has the receipt) cost a read, not a commit; new ones are not fsynced on their
        own: one lost to a power cut is sent again, since no receipt answered it. (After
        a promotion the verifier places every moved block on the new node one message at
        a time: a fsynced commit each held the fill's commits up behind them.)"""
        heights = list(heights)
        held = {r[0] for k in range(0, len(heights), 500) for r in self.conn.execute(
            f"SELECT height FROM storage_placements WHERE height IN ({','.join('?' * len(heights[k:k + 500]))})",
            heights[k:k + 500])}
        now = time.time()
        new = [(h, by, now) for h in dict.fromkeys(heights) if h not in held]
        if new:
            with self._unsynced(), immediate(self.conn):
                self.conn.executemany("INSERT OR IGNORE INTO storage_placements(height, by, at) VALUES (?, ?, ?)", new)

    def wanted(self, kind: str, limit: int = 100_000) -> list[int]:
        """Heights whose body this node must hold and does not: every certified header's
        for a full node, the placed ones for heavy and light nodes (lowest first)."""
        table = "storage_headers" if kind == "full" else "storage_placements"
        return [r[0] for r in self.conn.execute(
            f"SELECT height FROM {table} WHERE height NOT IN (SELECT height FROM storage_bodies) "
            "ORDER BY height LIMIT ?", (limit,))]
