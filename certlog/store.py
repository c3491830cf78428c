"""Durable state of one chain replica in SQLite (WAL, synchronous=FULL).

Tables live beside a role's own tables in its database, so a gateway can mark
readings as proposed in the same transaction that stores the proposal.
Trie nodes are content-addressed (`NodeDB`: an append-only log, found by hash
through an index file beside the database): nodes written while executing a block
that is never certified are harmless garbage; what is authoritative is the
certified header's state root.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, MutableMapping

from gridledger.logs import event

from .block import Certificate, ChainError, Header

__all__ = ["NodeDB", "ChainStore", "Elsewhere", "LogIndex", "connect", "immediate", "read_body"]

log = logging.getLogger("gridledger.chain")


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
    """Trie node store: reads through a cache, writes wait for `flush`.

    Nodes are appended to `trie_log` in the chain's own database, in the transaction
    of the block that made them, and found by hash through an index in a file of its
    own (`_NodeIndex`). A table keyed by the nodes' hashes, as this was, put every
    node a block makes on a random page of one B-tree: each dirtied a whole 8 KiB
    page, and once the table outgrew the cache, a 1,000-account block rewrote 20-45
    MB for 0.65 MB of nodes (bench/writes.py), a Raspberry Pi's SD card's wear.
    Appended, the nodes fill pages in order; the index's random inserts dirty
    512-byte pages. Nodes stored before (`trie_nodes`) are still read.

    Every block adds the nodes on its accounts' paths, so a cache that kept them all
    would grow for as long as the process runs: once written, the cache is dropped
    when it holds more than `CACHE_MAX` nodes (a few hundred bytes each), and the
    next reads go to SQLite. Without a connection the cache is the store.

    `writer`: this is the chain's store (`ChainStore`), which keeps the index; any
    other NodeDB on the file only reads it."""

    CACHE_MAX = 200_000

    def __init__(self, conn: sqlite3.Connection | None, *, writer: bool = False):
        self.conn = conn
        self.cache: dict[bytes, bytes] = {}
        self.pending: dict[bytes, bytes] = {}
        self._logged: list[tuple[int, bytes]] = []  # (log id, key) flushed, not yet committed
        self.index = None if conn is None else _NodeIndex(conn, writer=writer)

    def __getitem__(self, key: bytes) -> bytes:
        v = self.cache.get(key)
        if v is None:
            v = self.cache[key] = self.read(key)
        return v

    def read(self, key: bytes) -> bytes:
        """The node stored under `key`, from SQLite (KeyError if none), bypassing the cache."""
        if self.conn is None:
            raise KeyError(key)
        i = self.index.find((key,))
        if i is not None:
            row = self.conn.execute("SELECT key, value FROM trie_log WHERE id = ?", (i,)).fetchone()
            if row is not None and row[0] == key:
                return row[1]
            self.index.stale()  # a log replaced under its index (a restored copy): rebuilt, or scanned
            row = self.conn.execute("SELECT value FROM trie_log WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return row[0]
        row = self.conn.execute("SELECT value FROM trie_nodes WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return row[0]

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
        """Append pending nodes to the log; call inside the caller's transaction, and
        `committed()` or `rolled_back()` after it. Ids follow key order, so the index
        takes each block's keys in order (a quarter less CPU than in the order they
        were made, measured on the keyed table this replaced)."""
        if self.pending and self.conn is not None:
            first = self.conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM trie_log").fetchone()[0]
            rows = [(first + i, k, v) for i, (k, v) in enumerate(sorted(self.pending.items()))]
            self.conn.executemany("INSERT INTO trie_log(id, key, value) VALUES (?, ?, ?)", rows)
            self._logged += [(i, k) for i, k, _ in rows]
        self.pending.clear()
        if self.conn is not None and len(self.cache) > self.CACHE_MAX:
            self.cache.clear()

    def committed(self) -> None:
        """The transaction that flushed is durable: index its nodes. An index that
        cannot take them (its file locked too long, a full disk) must not fail the
        block that is already stored: the nodes are still found past the index's
        end, and the next open indexes them."""
        logged, self._logged = self._logged, []
        if logged:
            try:
                self.index.add([(i, (k,)) for i, k in logged])
            except sqlite3.Error as exc:
                event(log, "node_index_behind", logging.WARNING, nodes=len(logged), error=str(exc)[:160])

    def rolled_back(self) -> None:
        """The transaction that flushed was undone: its nodes are not stored, so they
        leave the cache too (made again, they are written again)."""
        for _, k in self._logged:
            self.cache.pop(k, None)
        self._logged = []


def _main_path(conn: sqlite3.Connection) -> str:
    """The main database's file ("" in memory)."""
    return next((r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main"), "") or ""


class LogIndex:
    """Row id by key for an append-only table (the log) in a database, kept in
    `<database><suffix>` beside it: the trie's nodes by hash (`_NodeIndex`), the
    gateway's readings by (meter, seq).

    Derived data: the writer brings it up to date from the log when it opens
    (`high` is the last log id it holds with every one before it), so a crash
    between a log's commit and its index's, a lost index file or a database
    restored from a copy costs a rebuild, never a row. Pages of 512 bytes: the keys
    fall all over the index, so each insert dirties a page, and the smallest pages
    are the fewest bytes (an index inside the database dirties 8 KiB ones). Its own
    fsyncs are left to checkpoints (synchronous=NORMAL), as what it loses in a power
    cut is rebuilt from the log. A reader (another connection, perhaps read-only)
    looks up what the index holds and scans the log beyond `high` for the rest;
    with no index file at all, it indexes the log in memory once.

    `key`: the log's key columns with their SQL types; keys are tuples of their
    values. `name`: the index file's tables are `{name}_index` and `{name}_index_high`."""

    PAGE_SIZE = 512

    def __init__(self, main: sqlite3.Connection, *, writer: bool, suffix: str, name: str, log: str,
                 key: tuple[tuple[str, str], ...], log_id: str = "id"):
        self.main = main
        self.writer = writer
        self.suffix, self.log, self.log_id = suffix, log, log_id
        self.key_cols = tuple(c for c, _ in key)
        self._table, self._high_table = f"{name}_index", f"{name}_index_high"
        cols = ", ".join(self.key_cols)
        self._schema = (f"CREATE TABLE IF NOT EXISTS {self._table} ("
                        + "".join(f"{c} {t} NOT NULL, " for c, t in key)
                        + f"id INTEGER NOT NULL, PRIMARY KEY ({cols})) WITHOUT ROWID;"
                        f"CREATE TABLE IF NOT EXISTS {self._high_table} (one INTEGER PRIMARY KEY CHECK (one = 1), "
                        "high INTEGER NOT NULL);")
        self._insert = (f"INSERT OR REPLACE INTO {self._table}({cols}, id) VALUES ("
                        + "?, " * len(self.key_cols) + "?)")
        self._lookup = f"SELECT id FROM {self._table} WHERE " + " AND ".join(f"{c} = ?" for c in self.key_cols)
        self._tail = (f"SELECT {log_id} FROM {log} WHERE {log_id} > ? AND "
                      + " AND ".join(f"{c} = ?" for c in self.key_cols))
        self._scan = f"SELECT {log_id}, {cols} FROM {log} WHERE {log_id} > ? ORDER BY {log_id} LIMIT 50000"
        self.mem: dict[tuple, int] | None = None  # in memory: the main database is, or no index file
        self.db: sqlite3.Connection | None = None
        self.high = 0
        path = _main_path(main)
        if path and writer:
            try:
                self.db = self._open(path + suffix)
            except sqlite3.OperationalError:  # a store opened where it cannot write: read as readers do
                self.writer = False
        if path and self.db is None and Path(path + suffix).exists():
            try:
                self.db = sqlite3.connect(Path(path + suffix).resolve().as_uri() + "?mode=ro", uri=True,
                                          check_same_thread=False, timeout=10)
            except sqlite3.OperationalError:
                self.db = None
        if self.db is None:  # in memory, or no index file to read
            self.mem = {}
        if self.writer:
            self.catch_up()

    def _open(self, path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        try:
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(f"PRAGMA page_size={self.PAGE_SIZE}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(self._schema)
        except sqlite3.OperationalError:
            db.close()
            raise
        return db

    def _stored_high(self) -> int:
        if self.db is None:
            return self.high
        try:
            row = self.db.execute(f"SELECT high FROM {self._high_table}").fetchone()
        except sqlite3.OperationalError:  # a reader before the writer made the tables
            return 0
        return row[0] if row else 0

    def catch_up(self) -> None:
        """Index the log beyond what the index holds; start over if the log is behind
        the index (a database restored from an older copy)."""
        high = self._stored_high()
        try:
            last = self.main.execute(f"SELECT COALESCE(MAX({self.log_id}), 0) FROM {self.log}").fetchone()[0]
        except sqlite3.OperationalError:  # a reader of a database that has no log yet
            return
        if last < high:
            self.rebuild()
            return
        self.high = high
        while True:
            rows = self.main.execute(self._scan, (self.high,)).fetchall()
            if not rows:
                return
            self.add([(r[0], r[1:]) for r in rows])

    def rebuild(self) -> None:
        if self.mem is not None:
            self.mem.clear()
        elif self.db is not None:
            with immediate(self.db):
                self.db.execute(f"DELETE FROM {self._table}")
                self.db.execute(f"DELETE FROM {self._high_table}")
        self.high = 0
        self.catch_up()

    def add(self, rows: list[tuple[int, tuple]]) -> None:
        """Index (id, key) rows, ids contiguous and ascending."""
        contiguous = rows[0][0] == self.high + 1
        if self.mem is not None:
            self.mem.update((k, i) for i, k in rows)
        else:
            with immediate(self.db):
                self.db.executemany(self._insert, sorted((*k, i) for i, k in rows))
                if contiguous:
                    self.db.execute(f"INSERT OR REPLACE INTO {self._high_table}(one, high) VALUES (1, ?)",
                                    (rows[-1][0],))
        if contiguous:
            self.high = rows[-1][0]

    def find(self, key: tuple) -> int | None:
        if self.mem is not None:
            if not self.writer and not self.mem and self.high == 0:
                self.catch_up()  # a reader without an index file: the log, indexed once
            i = self.mem.get(key)
            if i is not None:
                return i
        elif self.db is not None:
            try:
                row = self.db.execute(self._lookup, key).fetchone()
            except sqlite3.OperationalError:
                row = None
            if row is not None:
                return row[0]
        # Not indexed (yet): a row committed a moment ago, or a writer that stopped
        # before indexing it. The log's tail is short; without a log there is none.
        high = self.high if self.writer else self._stored_high()
        try:
            row = self.main.execute(self._tail, (high, *key)).fetchone()
        except sqlite3.OperationalError:
            return None
        return row[0] if row else None

    def stale(self) -> None:
        """The index sent a key to a log row holding another one."""
        if self.writer:
            self.rebuild()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


class _NodeIndex(LogIndex):
    """Trie log id by node hash, in `<database>.nodeindex`."""

    SUFFIX = ".nodeindex"

    def __init__(self, main: sqlite3.Connection, *, writer: bool):
        super().__init__(main, writer=writer, suffix=self.SUFFIX, name="node", log="trie_log",
                         key=(("key", "BLOB"),))


# A chain's app may keep the tail of a block's body in tables of its own (the
# gateway: the readings it already stored at ingest) and rebuild it on demand:
# `elsewhere(conn, height)` gives those transactions' bytes, in order.
Elsewhere = Callable[[sqlite3.Connection, int], list[bytes]]


def read_body(conn: sqlite3.Connection, height: int, elsewhere: Elsewhere | None = None) -> list[bytes]:
    """The body of block `height` as stored: its `chain_txs` rows, then, when the block
    keeps only some there (`chain_blocks.kept`), the rest from `elsewhere`. A plain
    reader of the database: safe on a read-only connection beside a running node."""
    body = [r[0] for r in conn.execute("SELECT data FROM chain_txs WHERE height = ? ORDER BY idx", (height,))]
    try:
        row = conn.execute("SELECT kept FROM chain_blocks WHERE height = ?", (height,)).fetchone()
    except sqlite3.OperationalError:  # a database from before `kept`: every body is whole in chain_txs
        return body
    if row is None or row[0] is None:
        return body
    if elsewhere is None:
        raise ChainError("body_elsewhere", f"block {height} keeps {row[0]} transactions here and the rest in its "
                         "app's tables: read it with the app's reader", height=height)
    return body + elsewhere(conn, height)


class ChainStore:
    """Blocks (header, body, certificate), votes and trie nodes of one chain.

    A block's body is its rows in `chain_txs`, unless `chain_blocks.kept` says only
    its first `kept` transactions are there: the rest come from `elsewhere`."""

    def __init__(self, conn: sqlite3.Connection, elsewhere: Elsewhere | None = None):
        self.conn = conn
        self.elsewhere = elsewhere
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
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS trie_log (id INTEGER PRIMARY KEY, key BLOB NOT NULL, "
                         "value BLOB NOT NULL)")
        except sqlite3.OperationalError:  # read-only, on a database from before the log: its nodes are all old
            pass
        if "kept" not in {r[1] for r in conn.execute("PRAGMA table_info(chain_blocks)")}:
            try:
                conn.execute("ALTER TABLE chain_blocks ADD COLUMN kept INTEGER")
            except sqlite3.OperationalError:  # read-only, from before: every body is whole in chain_txs
                pass
        self.nodes = NodeDB(conn, writer=True)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            with immediate(self.conn):
                yield self.conn
                self.nodes.flush()
        except BaseException:
            self.nodes.rolled_back()
            raise
        self.nodes.committed()

    # -- blocks ---------------------------------------------------------------
    def put_block(self, header: Header, txs: list[bytes], cert: Certificate | None, *,
                  kept: int | None = None) -> None:
        """Store a block; call inside `transaction()`. A proposal has no cert yet.
        `kept`: only the first `kept` transactions are written here; the others are
        already stored by the app, for `elsewhere` to give back (in this transaction)."""
        if kept is not None and self.elsewhere is None:
            raise ValueError("a block stored in part needs the store's `elsewhere`")
        now = time.time()
        self.conn.execute(
            "INSERT INTO chain_blocks(height, hash, header, cert, proposed_at, certified_at, kept) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (header.height, header.hash, header.encode(), cert.encode() if cert else None, now,
             now if cert else None, kept))
        self.conn.executemany("INSERT INTO chain_txs(height, idx, data) VALUES (?, ?, ?)",
                              [(header.height, i, t) for i, t in enumerate(txs if kept is None else txs[:kept])])

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
        return read_body(self.conn, height, self.elsewhere)

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
