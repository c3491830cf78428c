"""The coordinator's read side of an area chain: an index over certified blocks,
and answers that carry their own proofs (docs/queries.md).

`AreaLedger` indexes each certified block of a replica (as a `Replica` listener,
and with `catch_up` on start) and answers: an account's state at any height with
its MPT proof (`state_proof`), its latest certified state (`exact`), and every
reading of an account between two times (`interval`). Each answer carries the
headers, certificates, Merkle paths and MPT proofs that `coordinator.proofs`
checks against the validator set alone: a client trusts the validators, never
the coordinator. Readings stay ciphertexts.

Which account a reading is for: the registry says (meter ids are never reused,
so a meter's account never changes), and the certified state confirms it. After
each block every touched account's leaf, read at the block's state root, must
hold what the index derived - the new count, and the meter, seq, hash and time
of the account's last reading in the block - or indexing stops with
`index_mismatch` rather than index a wrong history.

Tables, beside the replica's own in its SQLite file:

    ledger_accounts  (id, account, n)                 n: readings indexed so far
    ledger_readings  (aid, n, t, height, idx, fresh, path, data)
                     key (aid, n); indexes (aid, t), (aid, height), (t)
    ledger_blocks    (height)                               indexed heights

`n` is the reading's number in its account (the leaf's count once applied);
per account t, n and height rise together, so one B-tree seek finds the first
reading at or after a time, and the account's state after block h is summed up
by its last reading at height <= h - no per-(account, height) table is needed.
`fresh` marks a reading that starts a meter's chain (seq 1, zero prev): the
account's first, or a replacement meter's. `path` is the reading's Merkle path in
its block and `data` the reading itself, both stored with the row: an account's
rows sit together, so an answer's readings and paths come from a few pages read
in order, not one random page of `chain_txs` per block (the reading is kept
twice, ~1.37 KB more per reading: a query server trades disk for answers whose
cost does not grow with the store, cached or not; docs/queries.md).
The index on `t` alone serves area load curves (`readings_ending`): every
account's reading of one interval.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Callable, Iterable, Mapping, Sequence

from aggregator.areaapp import account_key
from certlog.block import Certificate, ChainError, Header
from certlog.light import prove
from certlog.mpt import Trie, rlp_decode
from certlog.store import ChainStore, NodeDB, connect
from gridledger.errors import Rejected
from gridledger.wire import ZERO_HASH, parse_reading

from . import txpaths
from .proofs import ExactAnswer, IntervalPage, verify_exact, verify_interval, verify_interval_page, verify_state_proof

__all__ = ["AreaLedger", "LINK_GAP", "MAX_READINGS", "MAX_ACCOUNT", "verify_state_proof", "verify_exact",
           "verify_interval", "verify_interval_page", "ExactAnswer", "IntervalPage"]

# Between two heights an answer needs, up to this many headers are shipped to link
# them by `prev` rather than a second certificate: a header costs a client ~30 us
# to hash, a certificate ~1.5 ms (two pairings).
LINK_GAP = 32
MAX_READINGS = 1000  # in-range readings per interval answer; `next` continues from there
MAX_ACCOUNT = 64     # the registry's longest text field
_SKIPPED = (b'{"alert"', b'{"registry"')  # the area app's other transactions

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_blocks (height INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS ledger_accounts (
    id INTEGER PRIMARY KEY, account TEXT NOT NULL UNIQUE, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_readings (
    aid INTEGER NOT NULL, n INTEGER NOT NULL, t INTEGER NOT NULL, height INTEGER NOT NULL,
    idx INTEGER NOT NULL, fresh INTEGER NOT NULL, path BLOB NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (aid, n)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_readings_t ON ledger_readings (aid, t);
CREATE INDEX IF NOT EXISTS ledger_readings_height ON ledger_readings (aid, height);
CREATE INDEX IF NOT EXISTS ledger_readings_end ON ledger_readings (t);
"""
_ROW = "n, t, height, idx, fresh, path, data"
_TABLES = ("ledger_blocks", "ledger_accounts", "ledger_readings")


class _TrieReader(NodeDB):
    """Trie nodes for proofs, read without a cache (a proof touches a handful, and
    a long-running coordinator must not keep every node it ever proved)."""

    def __getitem__(self, key: bytes) -> bytes:
        return self.read(key)


def _drop_old_layout(conn: sqlite3.Connection) -> None:
    """The index is derived from the certified blocks: one in an older layout (before
    each reading's bytes sat in its account's rows) is dropped, and catch_up rebuilds it."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(ledger_readings)")}
    if cols and "data" not in cols:
        with conn:
            for table in _TABLES:
                conn.execute(f"DROP TABLE IF EXISTS {table}")


def _resolver(registry) -> Callable[[str], str | None]:
    """meter -> account from a `RegistryHistory` (every meter ever enrolled) or a static `Registry`."""
    if registry is None:  # a ledger opened to answer queries only
        return lambda meter: None
    if hasattr(registry, "account_of"):
        return registry.account_of
    return lambda meter: e.account if (e := registry.get(meter)) is not None else None


def _reader_for(conn: sqlite3.Connection) -> sqlite3.Connection:
    """A second connection to the same file, so queries never run inside the
    replica's write transactions (another thread); in memory, the same one."""
    path = next((r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main"), "")
    return connect(path) if path else conn


def _bad(detail: str) -> ChainError:
    return ChainError("bad_query", detail)


def check_account(account: object) -> str:
    if not isinstance(account, str) or not 0 < len(account) <= MAX_ACCOUNT or not account.isprintable():
        raise _bad(f"an account id is 1 to {MAX_ACCOUNT} printable characters")
    return account


class AreaLedger:
    """Read side of one area-chain replica (a ChainStore that only ever holds
    certified blocks, e.g. a Follower's). `registry`: a `RegistryHistory` or a
    static `Registry`, for the account of each meter (None: answer, never index)."""

    def __init__(self, store: ChainStore, chain: str, *, registry):
        self.store = store
        self.chain = chain
        self._account_of = _resolver(registry)
        _drop_old_layout(store.conn)
        store.conn.executescript(_SCHEMA)
        self._reader = _reader_for(store.conn)
        self._nodes = _TrieReader(self._reader)
        self._read_lock = threading.Lock()   # one query at a time on the reader
        self._write_lock = threading.Lock()  # one indexer
        self._accounts: dict[str, tuple[int, int]] = {
            a: (i, n) for i, a, n in store.conn.execute("SELECT id, account, n FROM ledger_accounts")}
        self.height = store.conn.execute("SELECT COALESCE(MAX(height), 0) FROM ledger_blocks").fetchone()[0]

    # -- indexing -------------------------------------------------------------
    def index(self, header: Header, txs: Sequence[bytes]) -> None:
        """Index a block just certified in the store (a `Replica` listener); a
        block already indexed is ignored, one past a gap first indexes the gap."""
        if header.chain != self.chain:
            raise ChainError("wrong_chain", f"{header.chain!r} is not {self.chain!r}", height=header.height)
        with self._write_lock:
            if header.height == self.height + 1:
                self._index_block(header, list(txs))
            elif header.height > self.height:
                self._catch_up()

    def catch_up(self) -> int:
        """Index the certified blocks of the store not yet indexed; how many."""
        with self._write_lock:
            return self._catch_up()

    def _catch_up(self) -> int:
        done = 0
        while True:
            raw = self.store.raw_block(self.height + 1)
            if raw is None or raw[1] is None:
                return done
            self._index_block(Header.decode(raw[0]), raw[2])
            done += 1

    def _index_block(self, header: Header, txs: list[bytes]) -> None:
        h = header.height
        touched: dict[str, list] = {}
        for i, tx in enumerate(txs):
            if tx.startswith(_SKIPPED):
                continue
            try:
                r = parse_reading(tx)
            except Rejected as exc:
                raise ChainError("index_mismatch", f"tx {i} is not a reading: {exc.reason}", height=h) from None
            account = self._account_of(r.meter)
            if account is None:
                raise ChainError("index_unknown_meter", f"{r.meter} (tx {i}) is in no registry entry", height=h)
            touched.setdefault(account, []).append((r, i))
        trie = Trie(self.store.nodes, bytes.fromhex(header.state_root))
        order = [i for items in touched.values() for _, i in items]
        paths = dict(zip(order, txpaths.paths(txs, order)))
        accounts, rows = [], []
        for account, items in touched.items():
            aid, n = self._accounts.get(account, (None, 0))
            last = items[-1][0]
            if _summary(trie.get(account_key(account))) != (n + len(items), last.meter, last.seq, last.hash, last.t):
                raise ChainError("index_mismatch", f"{account}: the certified state is not what its readings give",
                                 height=h)
            accounts.append((account, aid, n + len(items)))
            rows.append((account, [(n + k + 1, r.t, h, i, int(r.seq == 1 and r.prev == ZERO_HASH), paths[i],
                                    bytes(txs[i])) for k, (r, i) in enumerate(items)]))
        with self.store.transaction() as c:
            ids = {}
            for account, aid, n in accounts:
                if aid is None:
                    aid = c.execute("INSERT INTO ledger_accounts(account, n) VALUES (?, ?)", (account, n)).lastrowid
                else:
                    c.execute("UPDATE ledger_accounts SET n = ? WHERE id = ?", (n, aid))
                ids[account] = aid
            c.executemany("INSERT INTO ledger_readings(aid, n, t, height, idx, fresh, path, data) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(ids[a], *row) for a, rs in rows for row in rs])
            c.execute("INSERT INTO ledger_blocks(height) VALUES (?)", (h,))
        for account, aid, n in accounts:
            self._accounts[account] = (ids[account], n)
        self.height = h

    # -- reads (on the reader connection, one query at a time) ------------------
    def certified(self, height: int) -> tuple[Header, Certificate]:
        with self._read_lock:
            row = self._block_row(height)
        return Header.decode(row[0]), Certificate.from_dict(json.loads(row[1]))

    def head(self) -> tuple[Header, Certificate]:
        """The highest indexed certified block (what queries answer as of)."""
        return self.certified(self._top(None))

    def _block_row(self, height: int) -> tuple[bytes, bytes]:
        row = self._reader.execute("SELECT header, cert FROM chain_blocks WHERE height = ? AND cert IS NOT NULL",
                                   (height,)).fetchone() if type(height) is int else None
        if row is None:
            raise ChainError("unknown_height", f"no certified block at height {height}", height=height)
        return row

    def _top(self, height: int | None) -> int:
        if self.height == 0:
            raise ChainError("empty_chain", f"chain {self.chain} has no certified block indexed yet")
        if height is None:
            return self.height
        if type(height) is not int or not 1 <= height <= self.height:
            raise ChainError("unknown_height", f"height must be 1..{self.height}", height=height)
        return height

    def state_proof(self, account: str, height: int) -> dict:
        """The account's leaf at `height` (or its absence) with the MPT proof
        against that certified header's state root."""
        check_account(account)
        with self._read_lock:
            header, cert = self._block_row(height)
            hd = json.loads(header)
            anchor = self._anchor(account, height, hd)
        return {"chain": self.chain, "account": account, "height": height, "header": hd, "cert": json.loads(cert),
                "leaf": anchor["leaf"], "proof": anchor["proof"]}

    def boundary(self, account: str, t: int, *, height: int | None = None) -> int:
        """The greatest certified height (up to `height`, default the indexed head)
        whose state holds the account with leaf.last_t < t; 0 when there is none."""
        check_account(account)
        if type(t) is not int:
            raise _bad("t must be an integer")
        with self._read_lock:
            top = self._top(height)
            aid = self._aid(account)
            return 0 if aid is None else self._boundary(aid, t, top)

    def exact(self, account: str, *, height: int | None = None, certs: str = "linked") -> dict:
        """The account's latest certified state (as of `height`, default the indexed
        head) with its proof, and its latest reading with that reading's Merkle path."""
        check_account(account)
        _check_certs(certs)
        with self._read_lock:
            top = self._top(height)
            aid = self._aid(account)
            n = self._count_at(aid, top) if aid is not None else 0
            row = self._reader.execute(f"SELECT {_ROW} FROM ledger_readings WHERE aid = ? AND n = ?",
                                       (aid, n)).fetchone() if n else None
            headers, by_height = self._headers({top} | ({row[2]} if row else set()), certs)
            return {"chain": self.chain, "account": account, "height": top, "headers": headers,
                    "state": self._anchor(account, top, by_height[top]),
                    "reading": self._readings([row])[0] if row else None}

    def interval(self, account: str, t1: int, t2: int, *, limit: int = MAX_READINGS, height: int | None = None,
                 certs: str = "linked") -> dict:
        """Every reading of the account with t1 <= t <= t2 in account order, as of
        `height` (default the indexed head), with what proves none is missing:

        anchors  certified states of the account (MPT proofs): the first has
                 last_t < t1 (or is height 0, before any reading); the last is the
                 state just after the first reading past the covered range, or the
                 head; more where a fresh meter chain starts (meter replacement)
        readings all the account's readings between the first and last anchor
                 (the context outside [t1, t2] included), each with its Merkle path

        At most `limit` in-range readings: then `to` is the last one's time and
        `next` the time to continue from."""
        check_account(account)
        _check_certs(certs)
        if type(t1) is not int or type(t2) is not int or not 0 <= t1 <= t2 < 2 ** 62:
            raise _bad("from and to are times in seconds with 0 <= from <= to")
        if type(limit) is not int or not 0 < limit <= MAX_READINGS:
            raise _bad(f"limit must be 1..{MAX_READINGS}")
        with self._read_lock:
            top = self._top(height)
            aid = self._aid(account)
            covered, nxt = t2, None
            if aid is None:
                lo, hi, rows = 0, top, []
            else:
                hits = [r for r in self._reader.execute(
                    "SELECT t, height FROM ledger_readings WHERE aid = ? AND t >= ? AND t <= ? ORDER BY t LIMIT ?",
                    (aid, t1, t2, limit + 1)) if r[1] <= top]
                if len(hits) > limit:
                    covered = hits[limit - 1][0]
                    nxt = covered + 1
                lo = self._boundary(aid, t1, top)
                after = self._reader.execute("SELECT height FROM ledger_readings WHERE aid = ? AND t > ? "
                                             "ORDER BY t LIMIT 1", (aid, covered)).fetchone()
                hi = after[0] if after is not None and after[0] <= top else top
                rows = self._reader.execute(
                    f"SELECT {_ROW} FROM ledger_readings WHERE aid = ? AND n > ? AND n <= ? ORDER BY n",
                    (aid, self._count_at(aid, lo), self._count_at(aid, hi))).fetchall()
            # A fresh meter chain after the first breaks the hash links: a state just
            # before its block pins the readings on each side (docs/queries.md).
            anchors = sorted({lo, hi} | {r[2] - 1 for i, r in enumerate(rows) if i and r[4] and r[2] - 1 > lo})
            headers, by_height = self._headers(set(anchors) | {r[2] for r in rows}, certs)
            return {"chain": self.chain, "account": account, "from": t1, "to": covered, "next": nxt, "height": top,
                    "headers": headers,
                    "anchors": [self._anchor(account, a, by_height[a]) if a else {"height": 0} for a in anchors],
                    "readings": self._readings(rows)}

    def interval_ends(self, t1: int, t2: int) -> list[int]:
        """The distinct interval ends t, t1 < t <= t2, of the indexed readings of every account."""
        with self._read_lock:
            return [t for (t,) in self._reader.execute(
                "SELECT DISTINCT t FROM ledger_readings WHERE t > ? AND t <= ? ORDER BY t", (t1, t2))]

    def readings_ending(self, t: int) -> list[dict]:
        """Every indexed reading (any account) whose interval ends at `t`, in chain
        order, each with its Merkle path: {height, index, tx, path}."""
        with self._read_lock:
            rows = self._reader.execute(f"SELECT {_ROW} FROM ledger_readings WHERE t = ? ORDER BY height, idx",
                                        (t,)).fetchall()
            return self._readings(rows)

    # -- pieces of answers ------------------------------------------------------
    def _aid(self, account: str) -> int | None:
        entry = self._accounts.get(account)
        return entry[0] if entry else None

    def _count_at(self, aid: int, height: int) -> int:
        """The account's reading count after block `height` (its last reading at or below)."""
        row = self._reader.execute("SELECT n FROM ledger_readings WHERE aid = ? AND height <= ? "
                                   "ORDER BY height DESC, n DESC LIMIT 1", (aid, height)).fetchone()
        return row[0] if row else 0

    def _boundary(self, aid: int, t: int, top: int) -> int:
        first = self._reader.execute("SELECT height FROM ledger_readings WHERE aid = ? AND t >= ? ORDER BY t LIMIT 1",
                                     (aid, t)).fetchone()
        # The state before the block of the first reading at or after t; with none
        # (as of top), the state at top. 0 when that state does not hold the account.
        h = top if first is None or first[0] > top else first[0] - 1
        return h if h and self._count_at(aid, h) else 0

    def _anchor(self, account: str, height: int, header: Mapping) -> dict:
        return {"height": height, **prove(self._nodes, header["state_root"], account_key(account))}

    @staticmethod
    def _readings(rows: Sequence[tuple]) -> list[dict]:
        """The rows' transactions with their Merkle paths."""
        return [{"height": r[2], "index": r[3], "tx": bytes(r[6]).decode("ascii"), "path": txpaths.split(r[5])}
                for r in rows]

    def _headers(self, heights: Iterable[int], certs: str) -> tuple[list[dict], dict[int, dict]]:
        """The headers an answer needs, ascending: the highest with its certificate,
        each lower one linked through at most LINK_GAP headers by `prev`, or else
        with its own certificate (`certs="all"`: every one with its certificate)."""
        need = sorted({h for h in heights if h}, reverse=True)
        spans, with_cert, above = [], set(), None
        for h in need:
            if certs == "all" or above is None or above - h > LINK_GAP:
                with_cert.add(h)
                spans.append((h, h))
            else:
                spans.append((h, above - 1))
            above = h
        merged: list[list[int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out, by_height = [], {}
        for lo, hi in merged:
            for h, header, cert in self._reader.execute(
                    "SELECT height, header, cert FROM chain_blocks WHERE height BETWEEN ? AND ? AND cert IS NOT NULL "
                    "ORDER BY height", (lo, hi)):
                hd = by_height[h] = json.loads(header)
                out.append({"header": hd, "cert": json.loads(cert) if h in with_cert else None})
        missing = [h for h in need if h not in by_height]
        if missing:
            raise ChainError("unknown_height", f"no certified block at height {missing[0]}", height=missing[0])
        return out, by_height


def _summary(leaf: bytes) -> tuple | None:
    """(count, meter, seq, hash, last_t) of a certified leaf (`AccountState` without
    its canonical-encoding check, which certified state passed)."""
    if not leaf:
        return None
    meter, seq, h, count, last_t, _ = rlp_decode(leaf)
    n = lambda b: int.from_bytes(b, "big")  # noqa: E731
    return n(count), meter.decode(), n(seq), h.hex(), n(last_t)


def _check_certs(certs: str) -> None:
    if certs not in ("linked", "all"):
        raise _bad("certs is linked or all")
