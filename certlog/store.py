"""Durable state of one chain replica in SQLite (WAL, synchronous=FULL).

Tables live beside a role's own tables in its database, so a gateway can mark
readings as proposed in the same transaction that stores the proposal.
`trie_nodes` is content-addressed: nodes written while executing a block that is
never certified are harmless garbage; what is authoritative is the certified
header's state root.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, MutableMapping

from .block import Certificate, Header

__all__ = ["NodeDB", "ChainStore", "connect", "immediate"]


def connect(path: Path | str) -> sqlite3.Connection:
    """A store's connection: WAL, synchronous=FULL, and in a new file 8 KiB pages.

    A reading transaction is ~1.35 KB (a 4096-bit ciphertext in hex). With
    SQLite's default 4 KiB pages a row keeps at most ~1 KB in its B-tree page and
    moves the rest to an overflow page of its own: 4.7 KB on disk per reading.
    With 8 KiB pages a row fits: 1.37 KB. The page size only applies to a file
    with no table yet (and, once in WAL mode, it is fixed for good)."""
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=5000")  # before WAL: switching takes a lock
    conn.execute("PRAGMA page_size=8192")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE: the write lock up front, so it never
    fails half-way for a lock), committed on success and rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class NodeDB(MutableMapping[bytes, bytes]):
    """Trie node store: reads through a cache to SQLite, writes wait for `flush`.

    Every block adds the nodes on its accounts' paths, so a cache that kept them all
    would grow for as long as the process runs: once written, the cache is dropped
    when it holds more than `CACHE_MAX` nodes (a few hundred bytes each), and the
    next reads go to SQLite. Without a connection the cache is the store."""

    CACHE_MAX = 200_000

    def __init__(self, conn: sqlite3.Connection | None):
        self.conn = conn
        self.cache: dict[bytes, bytes] = {}
        self.pending: dict[bytes, bytes] = {}

    def __getitem__(self, key: bytes) -> bytes:
        v = self.cache.get(key)
        if v is None:
            row = None if self.conn is None else self.conn.execute(
                "SELECT value FROM trie_nodes WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise KeyError(key)
            v = self.cache[key] = row[0]
        return v

    def __setitem__(self, key: bytes, value: bytes) -> None:
        if key not in self.cache:
            self.cache[key] = value
            self.pending[key] = value

    def __delitem__(self, key: bytes) -> None:
        raise TypeError("trie nodes are never deleted (pruning is off)")

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
            return True
        except KeyError:
            return False

    def __iter__(self):
        return iter(self.cache)

    def __len__(self) -> int:
        return len(self.cache)

    def flush(self) -> None:
        """Write pending nodes; call inside the caller's transaction. In key order: a
        block's nodes land on random pages of the B-tree, and visiting them in order
        costs a quarter less CPU than in the order they were made (measured)."""
        if self.pending and self.conn is not None:
            self.conn.executemany("INSERT OR IGNORE INTO trie_nodes(key, value) VALUES (?, ?)",
                                  sorted(self.pending.items()))
        self.pending.clear()
        if self.conn is not None and len(self.cache) > self.CACHE_MAX:
            self.cache.clear()


class ChainStore:
    """Blocks (header, body, certificate), votes and trie nodes of one chain."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        conn.executescript("""
            CREATE TABLE IF NOT EXISTS chain_blocks (
                height INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, header BLOB NOT NULL,
                cert BLOB, proposed_at REAL, certified_at REAL);
            CREATE TABLE IF NOT EXISTS chain_txs (
                height INTEGER NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL,
                PRIMARY KEY (height, idx)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS chain_votes (
                height INTEGER PRIMARY KEY, hash TEXT NOT NULL, at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS trie_nodes (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
        """)
        self.nodes = NodeDB(conn)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with immediate(self.conn):
            yield self.conn
            self.nodes.flush()

    # -- blocks ---------------------------------------------------------------
    def put_block(self, header: Header, txs: list[bytes], cert: Certificate | None) -> None:
        """Store a block; call inside `transaction()`. A proposal has no cert yet."""
        now = time.time()
        self.conn.execute(
            "INSERT INTO chain_blocks(height, hash, header, cert, proposed_at, certified_at) VALUES (?, ?, ?, ?, ?, ?)",
            (header.height, header.hash, header.encode(), cert.encode() if cert else None, now,
             now if cert else None))
        self.conn.executemany("INSERT INTO chain_txs(height, idx, data) VALUES (?, ?, ?)",
                              [(header.height, i, t) for i, t in enumerate(txs)])

    def put_certificate(self, cert: Certificate) -> None:
        self.conn.execute("UPDATE chain_blocks SET cert = ?, certified_at = ? WHERE height = ? AND hash = ?",
                          (cert.encode(), time.time(), cert.height, cert.hash))

    def head(self) -> tuple[Header, Certificate] | None:
        """The highest certified block."""
        row = self.conn.execute("SELECT header, cert FROM chain_blocks WHERE cert IS NOT NULL "
                                "ORDER BY height DESC LIMIT 1").fetchone()
        return None if row is None else (Header.decode(row[0]), Certificate.from_dict(json.loads(row[1])))

    def proposal(self) -> tuple[Header, list[bytes]] | None:
        """A stored block still waiting for its certificate (a proposer's in-flight block)."""
        row = self.conn.execute("SELECT height, header FROM chain_blocks WHERE cert IS NULL "
                                "ORDER BY height DESC LIMIT 1").fetchone()
        return None if row is None else (Header.decode(row[1]), self.txs(row[0]))

    def raw_block(self, height: int) -> tuple[bytes, bytes | None, list[bytes]] | None:
        """Stored bytes of a block: header, certificate (or None), transactions."""
        row = self.conn.execute("SELECT header, cert FROM chain_blocks WHERE height = ?", (height,)).fetchone()
        return None if row is None else (row[0], row[1], self.txs(height))

    def txs(self, height: int) -> list[bytes]:
        return [r[0] for r in self.conn.execute(
            "SELECT data FROM chain_txs WHERE height = ? ORDER BY idx", (height,))]

    def heights(self) -> list[int]:
        return [r[0] for r in self.conn.execute("SELECT height FROM chain_blocks ORDER BY height")]

    # -- a validator's promises -----------------------------------------------
    def vote_for(self, height: int) -> str | None:
        row = self.conn.execute("SELECT hash FROM chain_votes WHERE height = ?", (height,)).fetchone()
        return row[0] if row else None

    def promise(self, height: int, header_hash: str) -> str:
        """Durably record the intent to sign `header_hash` at `height`, unless a
        different header was promised there; return the promised hash."""
        with self.transaction() as c:
            row = c.execute("SELECT hash FROM chain_votes WHERE height = ?", (height,)).fetchone()
            if row is not None:
                return row[0]
            c.execute("INSERT INTO chain_votes(height, hash, at) VALUES (?, ?, ?)", (height, header_hash, time.time()))
        return header_hash
