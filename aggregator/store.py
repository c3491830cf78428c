"""The gateway's SQLite store (WAL, synchronous=FULL): an ack is only sent after
the transaction holding its reading has reached the disk."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Mapping

import sqlite_utils

from certlog.store import connect
from gridledger.wire import Reading

from .ingest import ChainHead

__all__ = ["GatewayStore", "stored_counts"]


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
            readings.create_index(["t"])
        if "height" not in readings.columns_dict:  # databases from before the chain
            self.db.execute("ALTER TABLE readings ADD COLUMN height INTEGER")
        self.db.execute("CREATE INDEX IF NOT EXISTS readings_height ON readings(height)")
        if "tq" not in readings.columns_dict:  # the time-quality extension; NULL: a plain v1 reading
            self.db.execute("ALTER TABLE readings ADD COLUMN tq TEXT")
        if not self.db["evidence"].exists():
            self.db["evidence"].create({"id": int, "meter": str, "seq": int, "reason": str,
                                        "payload": str, "received_at": float}, pk="id")
        if "height" not in self.db["evidence"].columns_dict:
            self.db.execute("ALTER TABLE evidence ADD COLUMN height INTEGER")
        if not self.db["rejections"].exists():
            self.db["rejections"].create({"reason": str, "count": int}, pk="reason")

    def heads(self) -> dict[str, ChainHead]:
        rows = self.db.execute(
            "SELECT r.meter, r.seq, r.hash, r.t FROM readings r JOIN "
            "(SELECT meter, MAX(seq) AS seq FROM readings GROUP BY meter) m "
            "ON r.meter = m.meter AND r.seq = m.seq").fetchall()
        return {meter: ChainHead(seq, h, t) for meter, seq, h, t in rows}

    def stored_hash(self, meter: str, seq: int) -> str | None:
        row = self.db.execute("SELECT hash FROM readings WHERE meter=? AND seq=?", [meter, seq]).fetchone()
        return row[0] if row else None

    def commit(self, accepted: Iterable[Reading], evidence: Iterable[tuple[Reading, str]],
               rejections: Mapping[str, int]) -> None:
        """One durable transaction for a batch of readings, evidence and counters."""
        now = time.time()
        conn = self.db.conn
        # Plain executemany inside one explicit transaction: sqlite-utils' insert_all
        # commits on its own, which would split the batch.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO readings(meter, seq, t, dt, prev, kid, c, sig, hash, received_at, tq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.meter, r.seq, r.t, r.dt, r.prev, r.kid, r.c, r.sig, r.hash, now, r.tq) for r in accepted])
            conn.executemany(
                "INSERT INTO evidence(meter, seq, reason, payload, received_at) VALUES (?, ?, ?, ?, ?)",
                [(r.meter, r.seq, reason, r.to_json().decode(), now) for r, reason in evidence])
            conn.executemany(
                "INSERT INTO rejections(reason, count) VALUES (?, ?) "
                "ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count",
                list(rejections.items()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def rejection_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT reason, count FROM rejections").fetchall())

    def readings(self, meter: str | None = None) -> list[Reading]:
        sql = "SELECT meter, seq, t, dt, prev, kid, c, sig, tq FROM readings"
        args: list = []
        if meter is not None:
            sql += " WHERE meter = ?"
            args.append(meter)
        sql += " ORDER BY meter, seq"
        return [_reading(row) for row in self.db.execute(sql, args).fetchall()]

    def unblocked(self, conn: sqlite3.Connection, limit: int) -> tuple[list[int], list[Reading]]:
        """Readings not yet in a block, in acceptance order (so each meter's in seq order)."""
        rows = conn.execute("SELECT rowid, meter, seq, t, dt, prev, kid, c, sig, tq FROM readings "
                            "WHERE height IS NULL ORDER BY rowid LIMIT ?", (limit,)).fetchall()
        return [r[0] for r in rows], [_reading(r[1:]) for r in rows]

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

    @staticmethod
    def mark_blocked(conn: sqlite3.Connection, height: int, rowids: list[int], evidence_ids: list[int]) -> None:
        """Put `rowids` (readings) and `evidence_ids` in block `height` (0: set aside).

        `rowids` from `unblocked` are the oldest unblocked readings, so when they
        are all of those up to their largest one, a single statement through the
        height index marks them (a thousand keyed updates cost a tenth of a
        block's build); otherwise, or if anything else matched, one by one."""
        if rowids:
            lo, hi = min(rowids), max(rowids)
            cur = conn.execute("UPDATE readings SET height = ? WHERE height IS NULL AND rowid BETWEEN ? AND ?",
                               (height, lo, hi))
            if cur.rowcount != len(rowids):
                conn.execute("UPDATE readings SET height = NULL WHERE height = ? AND rowid BETWEEN ? AND ?",
                             (height, lo, hi))
                conn.executemany("UPDATE readings SET height = ? WHERE rowid = ?", [(height, r) for r in rowids])
        conn.executemany("UPDATE evidence SET height = ? WHERE id = ?", [(height, e) for e in evidence_ids])

    def close(self) -> None:
        self.db.conn.close()


def _reading(row: tuple) -> Reading:
    """A reading from (meter, seq, t, dt, prev, kid, c, sig, tq)."""
    return Reading(*row[:8], tq=row[8])
