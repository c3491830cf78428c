"""The gateway's SQLite store (WAL, synchronous=FULL): an ack is only sent after
the transaction holding its reading has reached the disk.

Readings are appended (rowid order is acceptance order) and found by (meter, seq)
through an index file beside the database (`<database>.readingindex`, certlog's
`LogIndex`), not a key inside it: a key on (meter, seq) took each new reading at
its meter's place, so a batch from many meters dirtied one 8 KiB page per meter,
and the bytes written per reading grew with the table (11.6 KB at 100,000
readings, in batches of 130: docs/performance.md). The index file's pages are 512
bytes and it is derived data, rebuilt from the table when lost or behind. A
database made with the key keeps it (SQLite cannot drop it without copying the
table) and works as before.

A reading's hex fields (prev, c, sig, hash) are stored as the bytes they spell:
half the size, so about 0.7 KB less per reading on disk, and twice that less
written (the WAL, then the checkpoint; bench/writes.py). SQLite's columns take
either type, so rows an older gateway wrote in hex are read as they are."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from itertools import islice
from pathlib import Path
from typing import Iterable, Mapping

import sqlite_utils

from certlog.store import LogIndex, connect, immediate
from gridledger.logs import event
from gridledger.wire import Reading, stored_reading

from .ingest import ChainHead

__all__ = ["GatewayStore", "block_readings", "stored_counts"]

log = logging.getLogger("gridledger.gateway.store")

# A reading's columns in the order `_reading` takes them.
_COLUMNS = "meter, seq, t, dt, prev, kid, c, sig, tq"
# A reading the chain refused is set aside (by rowid), in no block.
_NOT_SET_ASIDE = "rowid NOT IN (SELECT reading FROM readings_set_aside)"


def block_readings(conn: sqlite3.Connection, height: int) -> list[bytes]:
    """The readings of area-chain block `height`, as its body carries them: the
    canonical JSON of the rows it took (`GatewayStore.mark_blocked`), the ones after
    the previous block's last rowid up to its own, less those set aside, in rowid
    order. The block's tx root covers these bytes, so a changed row is a fault that
    `chain verify` and every light client report."""
    row = conn.execute("SELECT hi FROM reading_blocks WHERE height = ?", (height,)).fetchone()
    if row is None:
        return []  # a block of alerts or registry moves only
    lo = conn.execute("SELECT COALESCE(MAX(hi), 0) FROM reading_blocks WHERE height < ?", (height,)).fetchone()[0]
    rows = conn.execute(f"SELECT {_COLUMNS} FROM readings WHERE rowid > ? AND rowid <= ? AND {_NOT_SET_ASIDE} "
                        "ORDER BY rowid", (lo, row[0]))
    return [_reading(r).to_json() for r in rows]


def stored_counts(path: Path | str) -> dict[str, int]:
    """Readings stored per meter, read-only: safe beside a running gateway."""
    if not Path(path).exists():
        return {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return dict(conn.execute("SELECT meter, COUNT(*) FROM readings GROUP BY meter").fetchall())
    except sqlite3.OperationalError:
        return {}  # not created yet by the gateway


class GatewayStore:
    def __init__(self, path: Path | str):
        self.db = sqlite_utils.Database(connect(path))
        readings = self.db["readings"]
        if not readings.exists():
            readings.create({"meter": str, "seq": int, "t": int, "dt": int, "prev": str, "kid": str,
                             "c": str, "sig": str, "hash": str, "received_at": float})
        self._block_bookkeeping(readings)
        # (meter, seq) -> rowid. Its own connection is used from the ingest's worker
        # thread (commit) and the block builder's (equivocations): one at a time.
        self.index = LogIndex(self.db.conn, writer=True, suffix=".readingindex", name="reading", log="readings",
                              key=(("meter", "TEXT"), ("seq", "INTEGER")), log_id="rowid")
        self._index_lock = threading.Lock()
        # Readings committed but not yet in the index file: indexed every INDEX_EVERY
        # (derived data: after a crash the file catches up from the table).
        self._unindexed: dict[tuple[str, int], int] = {}
        # Each meter's highest stored seq, once `heads` has read them: what the
        # (meter, seq) key inside the database used to refuse, a second reading
        # stored for one seq, `commit` refuses by this (a meter's seqs only rise).
        self._top: dict[str, int] | None = None
        if "tq" not in readings.columns_dict:  # the time-quality extension; NULL: a plain v1 reading
            self.db.execute("ALTER TABLE readings ADD COLUMN tq TEXT")
        if not self.db["evidence"].exists():
            self.db["evidence"].create({"id": int, "meter": str, "seq": int, "reason": str,
                                        "payload": str, "received_at": float}, pk="id")
        if "height" not in self.db["evidence"].columns_dict:
            self.db.execute("ALTER TABLE evidence ADD COLUMN height INTEGER")
        if not self.db["rejections"].exists():
            self.db["rejections"].create({"reason": str, "count": int}, pk="reason")

    def _block_bookkeeping(self, readings) -> None:
        """Which readings are in which block, kept beside an append-only readings table.

        Blocks take the oldest readings not yet in one, in rowid order, so a block is
        its last rowid (`reading_blocks`); a reading the chain refuses is set aside by
        rowid (`readings_set_aside`, height 0 in the log). The readings table is never
        rewritten: writing a height into each row rewrote every page a block's readings
        sat on, about as many bytes again as the block itself, on a Raspberry Pi's SD
        card. Databases that kept a `height` column are carried over once."""
        db = self.db
        fresh = not db["reading_blocks"].exists()
        db.execute("CREATE TABLE IF NOT EXISTS reading_blocks (height INTEGER PRIMARY KEY, hi INTEGER NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS readings_set_aside (reading INTEGER PRIMARY KEY)")
        if fresh and "height" in readings.columns_dict:
            with db.conn:
                db.execute("INSERT INTO reading_blocks(height, hi) SELECT height, MAX(rowid) FROM readings "
                           "WHERE height > 0 GROUP BY height")
                db.execute("INSERT INTO readings_set_aside(reading) SELECT rowid FROM readings WHERE height = 0")
        db.execute("DROP INDEX IF EXISTS readings_height")  # the old column is no longer kept up to date
        db.execute("DROP INDEX IF EXISTS idx_readings_t")   # nothing reads readings by time here

    def unblocked_count(self, conn: sqlite3.Connection) -> int:
        """Readings waiting for a block, without a scan: rowids are dense (the table is
        append-only, and SQLite gives each insert the largest rowid plus one)."""
        lo, top = self._bounds(conn)
        return top - lo - len(self._aside(conn, lo))

    def heads(self) -> dict[str, ChainHead]:
        """Each meter's last stored reading (its highest seq): seq, hash and t."""
        self._flush_index()
        with self._index_lock:
            index = self.index
            index.catch_up()
            if index.mem is not None:
                last: dict[str, tuple[int, int]] = {}
                for (meter, seq), rid in index.mem.items():
                    if seq > last.get(meter, (0, 0))[0]:
                        last[meter] = (seq, rid)
                rids = [rid for _, rid in last.values()]
            else:  # SQLite's MAX() gives its row's other bare columns
                rids = [r[0] for r in index.db.execute("SELECT id, MAX(seq) FROM reading_index GROUP BY meter")]
        heads = {}
        for i in range(0, len(rids), 500):
            chunk = rids[i:i + 500]
            for meter, seq, h, t in self.db.execute(
                    "SELECT meter, seq, hash, t FROM readings WHERE rowid IN (%s)" % ",".join("?" * len(chunk)),
                    chunk):
                heads[meter] = ChainHead(seq, _hex(h), t)
        self._top = {meter: h.seq for meter, h in heads.items()}
        return heads

    def stored_hash(self, meter: str, seq: int) -> str | None:
        row = self._row_of(self.db.conn, meter, seq, "hash")
        return _hex(row[0]) if row else None

    def _row_of(self, conn: sqlite3.Connection, meter: str, seq: int, columns: str) -> tuple | None:
        """`columns` of the stored reading (meter, seq), found through the index, or None."""
        for _ in range(2):
            with self._index_lock:
                rid = self._unindexed.get((meter, seq)) or self.index.find((meter, seq))
            if rid is None:
                return None
            row = conn.execute(f"SELECT meter, seq, {columns} FROM readings WHERE rowid = ?", (rid,)).fetchone()
            if row is not None and row[:2] == (meter, seq):
                return row[2:]
            with self._index_lock:  # the index named another row: a database restored under it
                self.index.stale()
        return None

    def commit(self, accepted: Iterable[Reading], evidence: Iterable[tuple[Reading, str]],
               rejections: Mapping[str, int]) -> int | None:
        """One durable transaction for a batch of readings, evidence and counters.
        The rowid of the first reading (the others follow it one by one: each insert
        takes the largest rowid plus one), None when there were none."""
        now = time.time()
        conn = self.db.conn
        # Plain executemany inside one explicit transaction: sqlite-utils' insert_all
        # commits on its own, which would split the batch.
        fromhex = bytes.fromhex
        accepted = list(accepted)
        top, rose = self._top, {}
        if top is not None:
            for r in accepted:
                if r.seq <= (rose.get(r.meter) or top.get(r.meter, 0)):
                    raise sqlite3.IntegrityError(
                        f"reading {r.meter} seq {r.seq}: seq {rose.get(r.meter) or top[r.meter]} is stored already, "
                        "and a meter's readings are stored once, in rising seq")
                rose[r.meter] = r.seq
        rows = [(r.meter, r.seq, r.t, r.dt, fromhex(r.prev), r.kid, _c_bytes(r), fromhex(r.sig), fromhex(r.hash),
                 now, r.tq) for r in accepted]
        with immediate(conn):
            conn.executemany(
                "INSERT INTO readings(meter, seq, t, dt, prev, kid, c, sig, hash, received_at, tq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            last = conn.execute("SELECT MAX(rowid) FROM readings").fetchone()[0] if rows else None
            conn.executemany(
                "INSERT INTO evidence(meter, seq, reason, payload, received_at) VALUES (?, ?, ?, ?, ?)",
                [(r.meter, r.seq, reason, r.to_json().decode(), now) for r, reason in evidence])
            conn.executemany(
                "INSERT INTO rejections(reason, count) VALUES (?, ?) "
                "ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count",
                list(rejections.items()))
        if top is not None:
            top.update(rose)
        if last is None:
            return None
        first = last - len(rows) + 1
        with self._index_lock:
            self._unindexed.update(((r.meter, r.seq), first + i) for i, r in enumerate(accepted))
        if len(self._unindexed) >= self.INDEX_EVERY:
            self._flush_index()
        return first

    INDEX_EVERY = 2000

    def _flush_index(self) -> None:
        with self._index_lock:
            rows = sorted((rid, key) for key, rid in self._unindexed.items())
            self._unindexed.clear()
        if rows:
            self._index(rows)

    def _index(self, rows: list[tuple[int, tuple[str, int]]]) -> None:
        """Index readings just committed. An index that cannot take them (its file
        locked too long, a full disk) must not fail a batch that is already durable:
        they are still found past the index's end, and the next open indexes them."""
        try:
            with self._index_lock:
                self.index.add(rows)
        except sqlite3.Error as exc:
            event(log, "reading_index_behind", logging.WARNING, readings=len(rows), error=str(exc)[:160])

    def rejection_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT reason, count FROM rejections").fetchall())

    def readings(self, meter: str | None = None) -> list[Reading]:
        sql = f"SELECT {_COLUMNS} FROM readings"
        args: list = []
        if meter is not None:
            sql += " WHERE meter = ?"
            args.append(meter)
        sql += " ORDER BY meter, seq"
        return [_reading(row) for row in self.db.execute(sql, args).fetchall()]

    def unblocked(self, conn: sqlite3.Connection, limit: int,
                  held: dict[int, Reading] | None = None) -> tuple[list[int], list[Reading]]:
        """Readings not yet in a block, in acceptance order (so each meter's in seq order).
        `held`: readings still in memory from their ingest, by rowid (as `commit`
        numbered them), taken out and used as they are; only the others are read
        back whole (1.3 KB a row), in one query over their rowids' span.

        Which rowids are unblocked is arithmetic, not a scan: the table is
        append-only and its rowids dense (each insert takes the largest plus one),
        so they are those after the last block's up to the largest, less the few
        set aside. Listing them by query read every page of the block's rows (six
        to a page) back into the chain's connection, whose cache each of the
        ingest's commits clears."""
        lo, top = self._bounds(conn)
        aside = self._aside(conn, lo)
        rowids = list(islice((r for r in range(lo + 1, top + 1) if r not in aside), limit))
        # Every rowid listed is taken out of `held`, used or not, so nothing stays
        # there below the next block's first (dict.pop only: the ingest adds to
        # `held` from another thread meanwhile).
        held = {} if held is None else held
        readings = [held.pop(r, None) for r in rowids]
        missed = [k for k, r in zip(rowids, readings) if r is None]
        if missed:
            rows = {row[0]: row[1:] for row in conn.execute(
                f"SELECT rowid, {_COLUMNS} FROM readings WHERE rowid BETWEEN ? AND ?", (missed[0], missed[-1]))}
            kept = [(k, r) for k, r in zip(rowids, readings) if r is not None or k in rows]  # a hole is no reading
            rowids = [k for k, _ in kept]
            readings = [r or _reading(rows[k]) for k, r in kept]
        return rowids, readings

    @staticmethod
    def _bounds(conn: sqlite3.Connection) -> tuple[int, int]:
        """(the last blocked rowid, the largest rowid): two descents of a B-tree."""
        return conn.execute("SELECT (SELECT COALESCE(MAX(hi), 0) FROM reading_blocks), "
                            "(SELECT COALESCE(MAX(rowid), 0) FROM readings)").fetchone()

    @staticmethod
    def _aside(conn: sqlite3.Connection, lo: int) -> set[int]:
        return {r for (r,) in conn.execute("SELECT reading FROM readings_set_aside WHERE reading > ?", (lo,))}

    def unblocked_equivocations(self, conn: sqlite3.Connection) -> list[tuple[int, Reading, Reading]]:
        """Equivocation evidence not yet alerted on the chain, with the stored reading it conflicts with."""
        rows = conn.execute("SELECT id, payload, meter, seq FROM evidence "
                            "WHERE reason = 'equivocation' AND height IS NULL ORDER BY id").fetchall()
        out = []
        for eid, payload, meter, seq in rows:
            held = self._row_of(conn, meter, seq, _COLUMNS)
            if held is None:
                continue  # as the join this replaced: no stored reading, no alert
            obj = json.loads(payload)
            out.append((eid, Reading(**{k: obj[k] for k in ("meter", "seq", "t", "dt", "prev", "kid", "c", "sig")},
                                     tq=obj.get("tq")), _reading(held)))
        return out

    def mark_blocked(self, conn: sqlite3.Connection, height: int, rowids: list[int], evidence_ids: list[int]) -> None:
        """Put `rowids` (readings) and `evidence_ids` in block `height`; height 0 sets
        them aside. The readings of a block must be the oldest unblocked ones, as
        `unblocked` gives them: anything else is refused (ValueError), as it would
        put a reading in two blocks or in none."""
        if height == 0:
            conn.executemany("INSERT OR IGNORE INTO readings_set_aside(reading) VALUES (?)", [(r,) for r in rowids])
        elif rowids:
            # Exactly the unblocked rows up to its last. The rowids being dense, that
            # is arithmetic (a scan would read every page of the block's rows back);
            # only a list that fails it is compared with the rows themselves.
            (lo, top), hi = self._bounds(conn), max(rowids)
            aside = self._aside(conn, lo)
            dense = (len(set(rowids)) == len(rowids) and min(rowids) > lo and hi <= top
                     and aside.isdisjoint(rowids) and len(rowids) == hi - lo - sum(1 for r in aside if r <= hi))
            if not dense and sorted(rowids) != [r for (r,) in conn.execute(
                    f"SELECT rowid FROM readings WHERE rowid > ? AND rowid <= ? AND {_NOT_SET_ASIDE} ORDER BY rowid",
                    (lo, hi))]:
                raise ValueError(f"block {height}: {len(rowids)} readings are not the oldest unblocked run")
            conn.execute("INSERT INTO reading_blocks(height, hi) VALUES (?, ?)", (height, hi))
        conn.executemany("UPDATE evidence SET height = ? WHERE id = ?", [(height, e) for e in evidence_ids])

    def close(self) -> None:
        self._flush_index()
        self.index.close()
        self.db.conn.close()


def _reading(row: tuple) -> Reading:
    """A reading from (meter, seq, t, dt, prev, kid, c, sig, tq), as stored (bytes) or
    as an older gateway stored it (hex)."""
    r = stored_reading(*row)
    if r is not None:
        return r
    meter, seq, t, dt, prev, kid, c, sig, tq = row
    return Reading(meter, seq, t, dt, _hex(prev), kid, _c_hex(c), _hex(sig), tq=tq)


def _hex(v: bytes | str) -> str:
    return v.hex() if type(v) is bytes else v


def _c_bytes(r: Reading) -> bytes | str:
    """A ciphertext's hex as bytes: an odd number of digits gets a leading 0, which
    `_c_hex` takes off again (a well-formed c has no leading zero of its own). One
    that does, which no parsed reading has, is kept as it is."""
    c = r.c
    if c[:1] == "0" or not c:
        return c
    return r.ciphertext_bytes()


def _c_hex(c: bytes | str) -> str:
    if type(c) is not bytes:
        return c
    h = c.hex()
    return h[1:] if h[:1] == "0" else h
