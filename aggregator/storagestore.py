"""A storage node's SQLite store: certified headers, the bodies it keeps, its placements.

Every kind keeps every certified header it learns (with its certificate); bodies
are kept per height, all of a block's transactions and the marker that the body
is complete written in one transaction, so a body is either whole or absent.
The store trusts its callers to have run `admission`; it refuses only what would
contradict what it already holds (a second header at a height).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Sequence

from certlog.block import Certificate, ChainError, Header
from certlog.store import connect

__all__ = ["StorageStore"]


class StorageStore:
    def __init__(self, path: Path | str | None = None, *, conn: sqlite3.Connection | None = None):
        self.conn = conn if conn is not None else connect(path)
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS storage_headers (
                height INTEGER PRIMARY KEY, hash TEXT NOT NULL, header BLOB NOT NULL, cert BLOB NOT NULL,
                at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS storage_bodies (
                height INTEGER PRIMARY KEY, txs INTEGER NOT NULL, bytes INTEGER NOT NULL, at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS storage_txs (
                height INTEGER NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL,
                PRIMARY KEY (height, idx)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS storage_placements (
                height INTEGER PRIMARY KEY, by TEXT NOT NULL, at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS storage_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """)

    def close(self) -> None:
        self.conn.close()

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

    def put_bodies(self, bodies: Sequence[tuple[Header, Sequence[bytes]]]) -> list[int]:
        """Keep several bodies in one transaction (one commit, one fsync): all of them
        or none, so each is still whole or absent. Returns the heights newly kept."""
        held = set(self._held_bodies([header.height for header, _ in bodies]))
        txs_rows, body_rows, now = [], [], time.time()
        for header, txs in bodies:
            h = header.height
            if h in held:
                continue
            held.add(h)
            txs_rows += [(h, i, bytes(t)) for i, t in enumerate(txs)]
            body_rows.append((h, len(txs), sum(map(len, txs)), now))
        if body_rows:
            # executemany: one statement per table, not one Python round per row (20 rows a body)
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany("INSERT INTO storage_txs(height, idx, data) VALUES (?, ?, ?)", txs_rows)
                c.executemany("INSERT INTO storage_bodies(height, txs, bytes, at) VALUES (?, ?, ?, ?)", body_rows)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return [r[0] for r in body_rows]

    def _held_bodies(self, heights: Sequence[int]) -> list[int]:
        out: list[int] = []
        for k in range(0, len(heights), 500):   # SQLite's bound-parameter limit
            part = list(heights[k:k + 500])
            out += [r[0] for r in self.conn.execute(
                f"SELECT height FROM storage_bodies WHERE height IN ({','.join('?' * len(part))})", part)]
        return out

    def has_body(self, height: int) -> bool:
        return self.conn.execute("SELECT 1 FROM storage_bodies WHERE height = ?", (height,)).fetchone() is not None

    def body(self, height: int) -> list[bytes] | None:
        if not self.has_body(height):
            return None
        return [r[0] for r in self.conn.execute("SELECT data FROM storage_txs WHERE height = ? ORDER BY idx",
                                                (height,))]

    def tx(self, height: int, index: int) -> bytes | None:
        row = self.conn.execute("SELECT data FROM storage_txs WHERE height = ? AND idx = ?",
                                (height, index)).fetchone()
        return None if row is None else row[0]

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
        now = time.time()
        self._write([("INSERT OR IGNORE INTO storage_placements(height, by, at) VALUES (?, ?, ?)", (h, by, now))
                     for h in heights])

    def wanted(self, kind: str, limit: int = 100_000) -> list[int]:
        """Heights whose body this node must hold and does not: every certified header's
        for a full node, the placed ones for heavy and light nodes (lowest first)."""
        table = "storage_headers" if kind == "full" else "storage_placements"
        return [r[0] for r in self.conn.execute(
            f"SELECT height FROM {table} WHERE height NOT IN (SELECT height FROM storage_bodies) "
            "ORDER BY height LIMIT ?", (limit,))]
