"""Seed 000's Fig. 12/13: exact and interval queries (50 and 100 records) over an
area chain, at 50 % and 100 % of the data, every answer verified client side.

The store is built directly, block by block, but every block is real: one reading
per account per block, each a canonical wire-v1 reading signed with that meter's
Ed25519 key, hash-chained by `prev`, with a 4096-bit ciphertext (a random unit
mod n^2 of the 2048-bit test modulus: the query path never decrypts); the state
is computed by the area app itself (`AreaApp.execute`, trusted: the signatures
are not re-checked while building), the header carries the real Merkle and MPT
roots and a real BLS certificate of 3 of 4 validators; the index is built by
`AreaLedger.index` from each block as a follower would.

A query is timed from the question to the verified answer: `AreaLedger.exact` /
`interval` in this process, the answer through JSON as on the wire, then
`verify_exact` / `verify_interval` (certificate, header links, Merkle paths, hash
links, MPT proofs against the validator set). Baseline, on the same data in the
same run: the paper's MPT-ECISB method - the account's leaf gives its latest
reading, and `prev` is followed block by block (each hop a lookup of the previous
reading's location by hash, an index built for the baseline alone, then its
transaction and its stored Merkle path) back past the interval's start; the
client checks the same things over every reading walked.

--quick: 200 accounts x 400 readings, a fresh store. Default: 3,000 accounts x
2,000 readings (6 M readings, ~19 GB at ~3.1 KB a reading; the paper's
10,000 x 2,000 would need ~62 GB, see docs/queries.md), cached under
bench/.data/ and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from aggregator.areaapp import AccountState
from certlog.block import ZERO_HASH, ChainError
from certlog.validators import ValidatorSet
from coordinator import txpaths
from coordinator.ledger import verify_exact, verify_interval
from coordinator.proofs import _reading, _state, accept_headers
from gridledger.wire import Reading

from areachain import AREA, DT, AreaChain, account_id
from benchlib import ROOT, emit, load_test_modulus, machine, median

NAME = "query"
T0 = 1_600_000_200 // DT * DT
DATA = ROOT / "bench" / ".data"
PAPER = {"interval50_s": 0.8, "interval100_s": 1.0}  # seed 000, Fig. 13 (read off the text)


class Builder(AreaChain):
    """Blocks of one reading per account (seq = height), appended to `path`, with
    the baseline's own index: where the reading with this hash is (the paper's pointer)."""

    def __init__(self, path: Path, accounts: int):
        super().__init__(path, load_test_modulus(), accounts)
        self.store.conn.execute("CREATE TABLE IF NOT EXISTS bench_location (hash BLOB PRIMARY KEY, height INTEGER, "
                                "idx INTEGER, n INTEGER) WITHOUT ROWID")
        if self.head is not None:  # resuming: each meter's last reading from the latest block
            for i, tx in enumerate(self.store.txs(self.head.height)):
                self.prev[i], self.seq[i] = Reading(**json.loads(tx)).hash, self.head.height

    def block(self) -> None:
        h = self.height + 1
        t = T0 + DT * h
        # A random unit mod n^2 as the ciphertext: the query path never decrypts.
        readings = [self.reading(i, t, format(int.from_bytes(os.urandom(512), "big") % self.nsq, "x"))
                    for i in range(len(self.keys))]
        self.commit(readings, t * 1000 + 1000, also=lambda c: c.executemany(
            "INSERT INTO bench_location VALUES (?, ?, ?, ?)",
            [(bytes.fromhex(r.hash), h, i, h) for i, r in enumerate(readings)]))


# -- the baseline: the paper's walk along prev ------------------------------------------

def walk_answer(b: Builder, account: str, t1: int, t2: int) -> dict:
    """The latest state (MPT proof) and every reading from the latest back to the
    first before t1, found by following prev hash by hash (no time index)."""
    led, conn = b.ledger, b.ledger._reader
    top = led.height
    hd = json.loads(conn.execute("SELECT header FROM chain_blocks WHERE height = ?", (top,)).fetchone()[0])
    state = led._anchor(account, top, hd)
    st = AccountState.decode(bytes.fromhex(state["leaf"]))
    aid = led._aid(account)
    rows, h = [], st.hash
    while h != ZERO_HASH:
        height, idx, n = conn.execute("SELECT height, idx, n FROM bench_location WHERE hash = ?",
                                      (bytes.fromhex(h),)).fetchone()
        tx = conn.execute("SELECT data FROM chain_txs WHERE height = ? AND idx = ?", (height, idx)).fetchone()[0]
        path = conn.execute("SELECT path FROM ledger_readings WHERE aid = ? AND n = ?", (aid, n)).fetchone()[0]
        r = json.loads(tx)
        rows.append({"height": height, "index": idx, "tx": tx.decode(), "path": txpaths.split(path)})
        if r["t"] < t1:
            break
        h = r["prev"]
    rows.reverse()
    headers, _ = led._headers({top} | {r["height"] for r in rows}, "linked")
    return {"account": account, "height": top, "headers": headers, "state": state, "readings": rows}


def verify_walk(resp: dict, vset: ValidatorSet, account: str, t1: int, t2: int) -> list[Reading]:
    """The paper's check (SVM): certified headers, a Merkle path per reading, and the
    hash chain from the leaf's latest reading down past t1."""
    accepted = accept_headers(resp["headers"], vset, AREA)
    st = _state(resp["state"], accepted[resp["state"]["height"]], account)
    readings = [_reading(item, accepted)[2] for item in resp["readings"]]
    want = st.hash
    for r in reversed(readings):
        if r.hash != want:
            raise ChainError("broken_chain", f"seq {r.seq}")
        want = r.prev
    if readings and readings[0].t >= t1 and readings[0].prev != ZERO_HASH:
        raise ChainError("incomplete_start", "the walk stopped before t1")
    return [r for r in readings if t1 <= r.t <= t2]


# -- measurement ------------------------------------------------------------------------

def wire(obj):
    return json.loads(json.dumps(obj))


def measure(b: Builder, rng: random.Random, queries: int, baseline: int, strict: int) -> dict:
    """p50 in ms of each query kind over random accounts, every answer verified."""
    led, vset = b.ledger, b.vset
    top = led.height
    accounts = len(b.keys)

    def times(k: int) -> tuple[str, int, int, int]:
        i, s = rng.randrange(accounts), rng.randrange(1, top - k + 2)
        return account_id(i), T0 + DT * s, T0 + DT * (s + k - 1), k

    def run(n: int, fn) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
        return out

    def exact() -> None:
        acct = account_id(rng.randrange(accounts))
        got = verify_exact(wire(led.exact(acct)), vset, AREA, account=acct)
        assert got.height == top and got.state.count == top

    def interval(k: int, certs: str = "linked"):
        def q() -> None:
            acct, t1, t2, n = times(k)
            got = verify_interval(wire(led.interval(acct, t1, t2, certs=certs)), vset, AREA, acct, t1, t2,
                                  require_certificates=certs == "all")
            assert len(got) == n and got[0].t == t1 and got[-1].t == t2
        return q

    def walk(k: int):
        def q() -> None:
            acct, t1, t2, n = times(k)
            assert len(verify_walk(wire(walk_answer(b, acct, t1, t2)), vset, acct, t1, t2)) == n
        return q

    for _ in range(3):  # warm-up: first reads of the files
        exact()
        interval(100)()
    res = {"exact": run(queries, exact), "interval50": run(queries, interval(50)),
           "interval100": run(queries, interval(100)),
           "interval100_all_certs": run(strict, interval(100, "all")),
           "baseline_interval100": run(baseline, walk(100))}
    return {k: round(median(v), 2) for k, v in res.items()} | {"height": top, "samples": {k: len(v) for k, v in res.items()}}


def split(b: Builder, rng: random.Random, n: int) -> dict:
    """Where an interval-100 query's time goes, as of 50 % and 100 % of a built
    store: the server's first answer (pages as the OS cache has them), the same
    answer again (its pages now cached), and the client's verification."""
    led, out = b.ledger, {}
    full = led.height
    for top in (full // 2, full):
        led.height = top
        first, again, verify = [], [], []
        for _ in range(n):
            s = rng.randrange(1, top - 98)
            acct, t1, t2 = account_id(rng.randrange(len(b.keys))), T0 + DT * s, T0 + DT * (s + 99)
            for times in (first, again):
                t0 = time.perf_counter()
                resp = led.interval(acct, t1, t2)
                times.append((time.perf_counter() - t0) * 1000)
            resp = wire(resp)
            t0 = time.perf_counter()
            assert len(verify_interval(resp, b.vset, AREA, acct, t1, t2)) == 100
            verify.append((time.perf_counter() - t0) * 1000)
        out[f"as_of_{top}"] = {"server_first_ms": round(median(first), 2), "server_again_ms": round(median(again), 2),
                               "verify_ms": round(median(verify), 2)}
    led.height = full
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 accounts x 400 readings, a fresh store (< 1 min)")
    ap.add_argument("--accounts", type=int)
    ap.add_argument("--readings", type=int, help="readings per account (= blocks)")
    ap.add_argument("--fresh", action="store_true", help="rebuild the cached store")
    ap.add_argument("--split", action="store_true", help="on the built store: where interval-100's time goes "
                    "(first answer, the same again with its pages cached, verification) -> query_split.json")
    args = ap.parse_args()
    accounts = args.accounts or (200 if args.quick else 3000)
    blocks = args.readings or (400 if args.quick else 2000)
    queries, baseline, strict = (60, 10, 20) if args.quick else (300, 20, 40)
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"query-{accounts}x{blocks}.db"
    cached = path.exists() and not args.quick and not args.fresh
    if not cached and not args.split:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    b = Builder(path, accounts)
    rng = random.Random(12)
    if args.split:
        if b.height < blocks:
            raise SystemExit(f"{path} is not built: run without --split first")
        emit(NAME + "_split", {"accounts": accounts, "readings_per_account": blocks, **split(b, rng, 80),
                               "machine": machine()})
        return
    t0 = time.perf_counter()
    half = {}
    build_s = 0.0
    while b.height < blocks:
        b.block()
        if b.height == blocks // 2 and not cached:
            build_s += time.perf_counter() - t0
            half = measure(b, rng, queries, baseline, strict)
            print(json.dumps({"at": "50%", **half}), flush=True)
            t0 = time.perf_counter()
        if b.height % 100 == 0:
            print(f"[query] height {b.height}/{blocks} ({time.perf_counter() - t0 + build_s:.0f} s)", flush=True)
    build_s += time.perf_counter() - t0
    b.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    half_mode = "measured at 50 % while building"
    if not half:  # a reused store: queries as of the middle height
        half_mode = "as of the middle height of the cached store"
        b.ledger.height = blocks // 2
        half = measure(b, rng, queries, baseline, strict)
        b.ledger.height = blocks
    full = measure(b, rng, queries, baseline, strict)
    print(json.dumps({"at": "100%", **full}), flush=True)
    size = sum(os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}"))
    result = {
        "accounts": accounts, "readings_per_account": blocks, "readings": accounts * blocks,
        "db_gb": round(size / 1e9, 2), "build_s": round(build_s) if not cached else None, "half_mode": half_mode,
        "exact_p50_ms": full["exact"], "interval50_p50_ms": full["interval50"],
        "interval100_p50_ms": full["interval100"], "interval100_all_certs_p50_ms": full["interval100_all_certs"],
        "at_50": half, "at_100": full,
        "growth_50_to_100": round(full["interval100"] / half["interval100"], 3),
        "baseline": "paper's walk along prev from the latest reading (hash lookups), same checks",
        "baseline_interval100_p50_ms": full["baseline_interval100"],
        "ratio_baseline_to_index": round(full["baseline_interval100"] / full["interval100"], 1),
        "paper_interval50_ms": PAPER["interval50_s"] * 1000, "paper_interval100_ms": PAPER["interval100_s"] * 1000,
        "meter_signatures": "real Ed25519 over the signed bytes; not re-verified on the query path",
        "quick": args.quick, "machine": machine(),
    }
    emit(NAME if not args.quick else NAME + "_quick", result)


if __name__ == "__main__":
    main()
