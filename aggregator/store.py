"""The gateway's SQLite store (WAL, synchronous=FULL): an ack is only sent after
the transaction holding its reading has reached the disk.

A reading's hex fields (prev, c, sig, hash) are stored as the bytes they spell:
half the size, so about 0.7 KB less per reading on disk, and twice that less
written (the WAL, then the checkpoint; bench/writes.py). SQLite's columns take
either type, so rows an older gateway wrote in hex are read as they are."""

from __future__ import annotations

import json
import sqlite3
import time
from itertools import islice
from pathlib import Path
from typing import Iterable, Mapping

import sqlite_utils

from certlog.store import connect, immediate
from gridledger.wire import Reading, stored_reading

from .ingest import ChainHead

__all__ = ["GatewayStore", "block_readings", "stored_counts"]

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
                             "c": str, "sig": str, "hash": str, "received_at": float},
                            pk=("meter", "seq"))
        self._block_bookkeeping(readings)
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
        return conn.execute(
            "SELECT COALESCE((SELECT MAX(rowid) FROM readings), 0) - w.hi "
            "- (SELECT COUNT(*) FROM readings_set_aside WHERE reading > w.hi) "
            "FROM (SELECT COALESCE(MAX(hi), 0) AS hi FROM reading_blocks) w").fetchone()[0]

    def heads(self) -> dict[str, ChainHead]:
        rows = self.db.execute(
            "SELECT r.meter, r.seq, r.hash, r.t FROM readings r JOIN "
            "(SELECT meter, MAX(seq) AS seq FROM readings GROUP BY meter) m "
            "ON r.meter = m.meter AND r.seq = m.seq").fetchall()
        return {meter: ChainHead(seq, _hex(h), t) for meter, seq, h, t in rows}

    def stored_hash(self, meter: str, seq: int) -> str | None:
        row = self.db.execute("SELECT hash FROM readings WHERE meter=? AND seq=?", [meter, seq]).fetchone()
        return _hex(row[0]) if row else None

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
        rows = [(r.meter, r.seq, r.t, r.dt, fromhex(r.prev), r.kid, _c_bytes(r.c), fromhex(r.sig), fromhex(r.hash),
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
        return None if last is None else last - len(rows) + 1

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
        rows = conn.execute(
            "SELECT e.id, e.payload, r.meter, r.seq, r.t, r.dt, r.prev, r.kid, r.c, r.sig, r.tq FROM evidence e "
            "JOIN readings r ON r.meter = e.meter AND r.seq = e.seq "
            "WHERE e.reason = 'equivocation' AND e.height IS NULL ORDER BY e.id").fetchall()
        out = []
        for row in rows:
            obj = json.loads(row[1])
            out.append((row[0], Reading(**{k: obj[k] for k in ("meter", "seq", "t", "dt", "prev", "kid", "c", "sig")},
                                        tq=obj.get("tq")), _reading(row[2:])))
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


def _c_bytes(c: str) -> bytes | str:
    """A ciphertext's hex as bytes: an odd number of digits gets a leading 0, which
    `_c_hex` takes off again (a well-formed c has no leading zero of its own). One
    that does, which no parsed reading has, is kept as it is."""
    if c[:1] == "0" or not c:
        return c
    return bytes.fromhex("0" + c if len(c) & 1 else c)


def _c_hex(c: bytes | str) -> str:
    if type(c) is not bytes:
        return c
    h = c.hex()
    return h[1:] if h[:1] == "0" else h
