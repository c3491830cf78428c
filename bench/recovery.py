"""Seed 000's Fig. 8 on real parts: 10 storage nodes (2 full, 4 heavy, 4 light), the
verifier, four validators and the gateway under load from loadgen meters; a reader
loop measures verification throughput (transaction reads whose Merkle path verified
against the certified header, per second); one full node is killed with SIGKILL.

Before the failure a bulk of readings (`BULK`) is certified and stored, so the promoted
node's fill is megabytes (bandwidth), not a few bodies (request latency). The promoted
node samples where its threads spend the fill (`aggregator/sampler.py`): `fill_profile`.

Reports `detect_s` (kill -> the verifier's "dead"), `restore_s` (kill -> two full
replicas of every certified block on the certified P chain and in the promoted
node's store), `copy_rate_ratio` (bytes/s the promoted node fetched while filling,
over the raw rate of the same bytes between two local processes over a socketpair,
measured in this run; `broker_rate_Bps` beside it: the same bytes between two local
processes through this run's Mosquitto, for how much of the gap the broker hop is),
`copy_MBps`, `fill_profile` (the sampled top costs),
`throughput_before` / `throughput_after` (reads/s, means over
a window before the kill and right after restore) and writes a PNG of throughput
over time to bench/results/recovery.png."""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import random
import signal
import socket
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import aiomqtt

try:
    import matplotlib
except ImportError:
    raise SystemExit("bench/recovery.py plots with matplotlib: run ./run bench recovery (it installs the bench extra)")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from aggregator.admission import admit_body
from aggregator.pchainapp import load_pgenesis
from aggregator.receipts import sign_receipts
from aggregator.storagestore import StorageStore
from aggregator.storagewire import decode_body, encode_body
from certlog import bls, merkle
from certlog.block import Header
from certlog.store import connect, immediate
from aggregator.reader import ReadError, Reader, load_reader_config
from aggregator.storage import FILL_PROFILE_ENV
from gridledger.broker import start_mosquitto
from gridledger.loadgen import precompute, run_load
from gridledger.storagebed import start_storage_layout, write_storage_layout
from gridledger.testbed import gateway_process, wait_up

from benchlib import RESULTS, emit, load_test_modulus, machine, parse_args
from certify import (AREA, UP_TIMEOUT_S, FixedRhos, load_meters, log_events, meter_keys, start_validators, stop,
                     write_area)

NAME = "recovery"
READERS = 8          # reads in flight
# Readings certified and stored before the paced load and the kill: (meters, readings each).
# 100 readings a block (~135 KB bodies, one to a 256 KiB response); the promoted heavy
# node holds about a quarter of the blocks, so it fetches about 3/4 of the bulk.
BULK = {True: (50, 120), False: (100, 240)}
BLOCK_MAX = 100
VERIFIER = {"probe_s": 0.5, "retry_s": 1.0, "audit_s": 2.0, "audit_deadline_s": 1.0, "audit_late_s": 1.0,
            "dead_missing": 3}


def raw_copy_rates(nbytes: int, runs: int = 5) -> list[float]:
    """`raw_copy_rate` several times: at a few megabytes one copy takes milliseconds and
    a busy neighbour moves it by a factor of three, so the bench reports the median."""
    return [raw_copy_rate(nbytes) for _ in range(runs)]


def raw_copy_rate(nbytes: int, chunk: int = 256 * 1024) -> float:
    """Bytes/s of `nbytes` sent from a child process to this one over a socketpair."""
    a, b = socket.socketpair()
    child = multiprocessing.get_context("fork").Process(target=_send, args=(a, nbytes, chunk))
    t0 = time.perf_counter()
    child.start()
    a.close()
    got = 0
    while got < nbytes:
        got += len(b.recv(1 << 20))
    dt = time.perf_counter() - t0
    child.join()
    b.close()
    return nbytes / dt


def _send(sock: socket.socket, nbytes: int, chunk: int) -> None:
    data = bytes(chunk)
    left = nbytes
    while left > 0:
        sock.sendall(data[:min(chunk, left)])
        left -= chunk
    sock.close()


def broker_copy_rate(host: str, port: int, nbytes: int, chunk: int = 256 * 1024) -> float:
    """Bytes/s of `nbytes` published in `chunk`s (QoS 0) by a child process and
    received here through the broker: the raw copy with the broker hop in it."""
    async def receive(ready, done) -> float:
        async with aiomqtt.Client(host, port, identifier="bench-recv") as c:
            await c.subscribe("bench/copy")
            ready.set()
            got, t0 = 0, None
            async with asyncio.timeout(60):
                async for msg in c.messages:
                    t0 = t0 or done.get()   # the sender's start time
                    got += len(msg.payload)
                    if got >= nbytes:
                        return nbytes / (time.time() - t0)
        raise RuntimeError("unreachable")

    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_publish, args=(host, port, nbytes, chunk, ready, done))
    child.start()
    try:
        return asyncio.run(receive(ready, done))
    finally:
        child.join(10)


def _publish(host: str, port: int, nbytes: int, chunk: int, ready, done) -> None:
    async def send() -> None:
        async with aiomqtt.Client(host, port, identifier="bench-send") as c:
            ready.wait(30)
            data, left = bytes(chunk), nbytes
            done.put(time.time())
            while left > 0:
                await c.publish("bench/copy", data[:min(chunk, left)], qos=0)
                left -= chunk
    asyncio.run(send())


FLOOR_COMMIT = 1 << 20   # bytes of bodies per commit in `floor_costs`: a group commit of several responses


def floor_costs(txs: list[bytes], per_body: int, folder: Path, repeat: int = 3) -> dict[str, float]:
    """Milliseconds per megabyte of each step a node must take to keep a fetched body,
    each alone (one process, no broker, no peers), on bodies of `per_body` of these
    transactions: `decode` (transfer bytes -> transactions), `merkle` (the tx root the
    admission compares), `store` (a durable group per `FLOOR_COMMIT` with `put_bodies` into
    a fresh store: records appended to the body file, one fdatasync, then the index
    committed), `sign` (one receipt batch per commit), and `sha256` (every byte hashed
    once: the floor of any check that a body is the certified one). Beside them
    `sqlite_rows`: the same groups kept as the store kept them before the body file (a
    row per transaction, one durable SQLite commit per group), for comparison only.
    Medians of `repeat`."""
    bodies = [txs[k:k + per_body] for k in range(0, len(txs), per_body)]
    headers = [Header(chain=AREA, height=h + 1, prev="0" * 64, time=0, tx_root=merkle.root(b), state_root="0" * 64,
                      txs=len(b), app={}) for h, b in enumerate(bodies)]
    encoded = [encode_body(b) for b in bodies]
    mb = sum(map(len, encoded)) / 1e6
    commits, size = [[]], 0
    for k, e in enumerate(encoded):
        if size + len(e) > FLOOR_COMMIT and commits[-1]:
            commits.append([])
            size = 0
        commits[-1].append(k)
        size += len(e)
    sk = bls.KeyGen(b"bench recovery floor" + bytes(12))

    # The stores are opened before the clock starts (opening is not part of keeping a body),
    # and the store is handed what the fill hands it: admitted bodies with their transfer
    # bytes and leaf hashes (the admission computed them; `merkle` above counts that).
    admitted = [admit_body(headers[k], decode_body(e, views=True), e) for k, e in enumerate(encoded)]
    opened: dict = {}

    def store_once(run: int) -> None:
        store = opened.pop(("store", run))
        for ks in commits:
            store.put_bodies([admitted[k] for k in ks])
        store.close()

    def rows_once(run: int) -> None:   # the layout before the body file: a row per transaction
        conn = opened.pop(("rows", run))
        for ks in commits:
            with immediate(conn):
                conn.executemany("INSERT INTO txs VALUES (?, ?, ?)",
                                 [(k, i, t) for k in ks for i, t in enumerate(bodies[k])])
        conn.close()

    for run in range(repeat):
        opened[("store", run)] = StorageStore(folder / f"floor-{run}.db")
        opened[("rows", run)] = conn = connect(folder / f"floor-rows-{run}.db")
        conn.execute("CREATE TABLE txs (height INTEGER NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL, "
                     "PRIMARY KEY (height, idx)) WITHOUT ROWID")

    steps = {"decode": lambda _: [decode_body(e, views=True) for e in encoded],
             "merkle": lambda _: [merkle.root(b) for b in bodies],
             "store": store_once,
             "sqlite_rows": rows_once,
             "sign": lambda _: [sign_receipts(sk, [headers[k] for k in ks], "n", "full") for ks in commits],
             "sha256": lambda _: [hashlib.sha256(e).digest() for e in encoded]}
    out = {}
    for name, step in steps.items():
        times = []
        for run in range(repeat):
            t0 = time.perf_counter()
            step(run)
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1000 / mb, 2)
    return out


def certified_txs(db: Path) -> dict[int, int]:
    """height -> transaction count of every certified area block."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT height, header FROM chain_blocks WHERE cert IS NOT NULL").fetchall()
    return {h: Header.decode(raw).txs for h, raw in rows}


def held(db: Path) -> set[int]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return {r[0] for r in conn.execute("SELECT height FROM storage_bodies")}
    except sqlite3.OperationalError:
        return set()


class Throughput:
    """Verified reads per one-second bucket (wall clock)."""

    def __init__(self):
        self.ok: dict[int, int] = {}
        self.errors = 0
        self.wrong = 0

    async def loop(self, reader: Reader, blocks, stop: asyncio.Event) -> None:
        while not stop.is_set():
            sizes = blocks()
            h = random.choice(list(sizes))
            try:
                await reader.read(h, random.randrange(sizes[h]))
            except ReadError:
                self.errors += 1
                await asyncio.sleep(0.05)
                continue
            sec = int(time.time())
            self.ok[sec] = self.ok.get(sec, 0) + 1

    def mean(self, t0: float, t1: float) -> float:
        secs = range(int(t0) + 1, int(t1))   # whole seconds only
        return sum(self.ok.get(s, 0) for s in secs) / max(1, len(secs))


async def bulk_load(wd: Path, reader_cfg: Path, broker, payloads) -> dict:
    """Send `payloads` at once; wait until every certified block is on both full nodes
    and stored (> 2/3 of its chosen nodes receipted) on the certified P chain."""
    t0 = time.time()
    await run_load(broker.host, broker.port, AREA, payloads, window=500, timeout=600)
    gw = wd / "gateway.db"
    settings, mqtt = load_reader_config(reader_cfg)
    async with Reader(settings, mqtt) as reader:
        while True:
            certified = certified_txs(gw)
            if sum(certified.values()) >= len(payloads):
                reader.view.refresh()
                reps = [reader.view.replicas(h) for h in certified]
                if all(r is not None and len(r.nodes) >= 3 for r in reps) and all(
                        set(certified) <= held(wd / "storage" / f"{f}.db") for f in ("f1", "f2")):
                    break
            if time.time() - t0 > 600:
                raise RuntimeError("the bulk was not certified and stored within 600 s")
            await asyncio.sleep(0.5)
    return {"readings": len(payloads), "blocks": len(certified), "seconds": round(time.time() - t0, 1)}


async def scenario(wd: Path, reader_cfg: Path, procs: dict, broker, payloads, quick: bool) -> dict:
    genesis = load_pgenesis(wd / "pchain-genesis.toml")
    window_s = 5.0 if quick else 15.0
    tp, stop_reads = Throughput(), asyncio.Event()
    batch = max(1, len(payloads) // (12 if quick else 40))

    async def load() -> None:   # paced: a batch a second, so load runs through the failure
        for k in range(0, len(payloads), batch):
            await run_load(broker.host, broker.port, AREA, payloads[k:k + batch], timeout=60)
            await asyncio.sleep(1.0)

    loading = asyncio.create_task(load())
    gw = wd / "gateway.db"
    settings, mqtt = load_reader_config(reader_cfg)
    sizes = {}

    def blocks():
        return sizes

    async with Reader(settings, mqtt, window=READERS) as reader:
        while not sizes:   # blocks the P chain has placed and receipted
            reader.view.refresh()
            sizes = {h: n for h, n in certified_txs(gw).items() if (r := reader.view.replicas(h)) and r.nodes}
            await asyncio.sleep(0.2)
        readers = [asyncio.create_task(tp.loop(reader, blocks, stop_reads)) for _ in range(READERS)]
        t_start = time.time()
        await asyncio.sleep(window_s + 1)
        t_kill = time.time()
        procs.pop("f1").send_signal(signal.SIGKILL)
        detect = restore = None
        new = None
        while restore is None and time.time() - t_kill < 120:
            await asyncio.sleep(0.2)
            if detect is None:
                ev = log_events(wd / "verifier.log", "dead")
                detect = ev[0]["ts"] if ev else None
            reader.view.refresh()
            roles = reader.view.roles()
            if "f1" in roles.dead and len(roles.full) == 2:
                new = next(n for n in roles.full if n != "f2")
                certified = certified_txs(gw)
                reps = {h: reader.view.replicas(h) for h in certified}
                if all(r is not None and new in r.nodes and "f2" in r.nodes for r in reps.values()) and \
                        set(certified) <= held(wd / "storage" / f"{new}.db"):
                    restore = time.time()
        if restore is None:
            raise RuntimeError("two full replicas were not restored within 120 s")
        await asyncio.sleep(window_s + 1)
        t_end = time.time()
        stop_reads.set()
        await asyncio.gather(*readers)
    await loading
    filled = log_events(wd / f"storage-{new}.log", "filled")
    promoted = log_events(wd / "verifier.log", "promoted")
    return {"genesis_full": list(genesis.full), "t": (t_start, t_kill, detect, restore, t_end), "tp": tp,
            "new": new, "filled": filled[0] if filled else None,
            "promoted_at": promoted[0]["ts"] if promoted else None, "window_s": window_s}


def per_mb(stages: dict, nbytes: int) -> dict[str, float]:
    """Milliseconds per megabyte filled, per stage the promoted node timed (most first)."""
    if not nbytes:
        return {}
    ms = {k: v["s"] * 1000 / (nbytes / 1e6) for k, v in stages.items()}
    return {k: round(v, 2) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}


def plot(path: Path, tp: Throughput, t: tuple, promoted_at: float | None) -> str:
    t_start, t_kill, detect, restore, t_end = t
    secs = list(range(int(t_start) + 1, int(t_end)))
    xs, ys = [s - t_kill for s in secs], [tp.ok.get(s, 0) for s in secs]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, ys, label="verified reads/s")
    for x, what, c in ((0, "kill -9 f1", "tab:red"), (detect - t_kill, "detected", "tab:orange"),
                       (restore - t_kill, "two full again", "tab:green")):
        ax.axvline(x, color=c, linestyle="--", label=what)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the full node was killed")
    ax.set_ylabel("reads with Merkle paths verified per second")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return "matplotlib"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    n = load_test_modulus()
    meters, per_meter = (20, 24) if args.quick else (50, 80)
    bulk_meters, bulk_per = BULK[args.quick]
    keys = meter_keys(max(meters, bulk_meters))
    # Each meter's readings in seq order: the bulk first, then the paced load (the first `meters`).
    every = precompute(load_meters(keys, n, bulk_per + per_meter), bulk_per + per_meter, FixedRhos(n))
    bulk = [o for o in every if o.seq <= bulk_per]
    payloads = [o for o in every if o.seq > bulk_per and int(o.meter[2:]) < meters]
    with tempfile.TemporaryDirectory(prefix="gl-recovery-") as tmp:
        wd = Path(tmp)
        broker = start_mosquitto(wd / "broker")
        procs: list = []
        storage: dict = {}
        os.environ[FILL_PROFILE_ENV] = str(wd)   # inherited by the storage nodes
        try:
            configs = write_area(wd, keys, n, broker, 4, block_max=BLOCK_MAX)
            layout = write_storage_layout(wd, area=AREA, host=broker.host, port=broker.port,
                                          validator_configs=configs, storage={"catchup_s": 1.0, "timeout_s": 2.0},
                                          **VERIFIER)
            procs = start_validators(configs, wd)
            procs.append(gateway_process(wd / "gateway.toml", wd / "gateway.log"))
            wait_up(wd / "gateway.log", procs[-1], UP_TIMEOUT_S)
            storage = start_storage_layout(layout, wd, timeout=UP_TIMEOUT_S)
            bulked = asyncio.run(bulk_load(wd, layout.reader, broker, bulk))
            r = asyncio.run(scenario(wd, layout.reader, storage, broker, payloads, args.quick))
            stop(list(storage.values()) + procs)
            filled = r["filled"] or {"bytes": 0, "seconds": 0.0, "busy_s": 0.0}
            profile_file = wd / f"{r['new']}.json"
            profile = json.loads(profile_file.read_text()) if profile_file.exists() else {}
            via_broker = broker_copy_rate(broker.host, broker.port, max(filled["bytes"], 1 << 20))
            floor = floor_costs([o.body for o in bulk], BLOCK_MAX, wd)
        finally:
            stop(list(storage.values()) + procs)
            broker.stop()
    t_start, t_kill, detect, restore, t_end = r["t"]
    tp, w = r["tp"], r["window_s"]
    copy_rate = filled["bytes"] / filled["busy_s"] if filled["busy_s"] else 0.0
    raws = raw_copy_rates(max(filled["bytes"], 1 << 20))
    raw = statistics.median(raws)
    keep_ms = sum(floor[k] for k in ("decode", "merkle", "store", "sign"))   # ms/MB to keep a body, network aside
    keep_rows_ms = keep_ms - floor["store"] + floor["sqlite_rows"]           # the same with the rows of before
    raw_ms = 1e9 / raw   # ms per MB of the raw copy
    broker_ms = 1e9 / via_broker if via_broker else 0.0
    RESULTS.mkdir(parents=True, exist_ok=True)
    how = plot(RESULTS / "recovery.png", tp, r["t"], r["promoted_at"])
    before = tp.mean(t_kill - w, t_kill)
    after = tp.mean(restore, restore + w)
    after_promotion = tp.mean(r["promoted_at"], r["promoted_at"] + w) if r["promoted_at"] else 0.0
    result = {
        "bench": NAME, "quick": args.quick, "machine": machine(),
        "layout": {"full": 2, "heavy": 4, "light": 4}, "promoted": r["new"],
        "detect_s": round(detect - t_kill, 3) if detect else None,
        "restore_s": round(restore - t_kill, 3),
        "copy_bytes": filled["bytes"], "copy_s": filled["seconds"], "copy_busy_s": filled["busy_s"],
        "copy_rate_Bps": round(copy_rate), "copy_MBps": round(copy_rate / 1e6, 2), "bulk": bulked,
        "fill_ms_per_MB": per_mb(profile.get("stages", {}), filled["bytes"]),
        # the promoted node's CPU (all its threads) over the fill, per MB filled
        "fill_cpu_ms_per_MB": round(filled["cpu_s"] * 1000 / (filled["bytes"] / 1e6), 2)
        if filled.get("cpu_s") and filled["bytes"] else None,
        "fill_sampled": profile.get("own", [])[:8], "fill_profile": profile,
        "raw_rates_Bps": [round(x) for x in raws],
        # What keeping a fetched body costs at least, step by step, and the copy-rate ratio
        # a fill could reach if it did nothing else (no broker, no peers, no waiting):
        "floor_ms_per_MB": floor, "raw_ms_per_MB": round(raw_ms, 2), "broker_ms_per_MB": round(broker_ms, 2),
        "ratio_ceiling_keep": round(raw_ms / keep_ms, 4) if keep_ms else None,
        "ratio_ceiling_keep_rows": round(raw_ms / keep_rows_ms, 4) if keep_rows_ms else None,
        # the broker hop and the keeping one after the other (one core's worth of each, as
        # here), and each on its own core (pipelined: broker, verify + write, as on a 4-core Pi)
        "ratio_ceiling_serial": round(raw_ms / (broker_ms + keep_ms), 4) if keep_ms else None,
        "ratio_ceiling_pipelined": round(raw_ms / max(broker_ms, keep_ms), 4) if keep_ms else None,
        "ratio_ceiling_sha256": round(raw_ms / floor["sha256"], 4) if floor["sha256"] else None,
        "ratio_ceiling_broker": round(via_broker / raw, 4) if raw else None,   # the fabric alone, nothing kept
        "raw_rate_Bps": round(raw), "copy_rate_ratio": round(copy_rate / raw, 6) if raw else None,
        "broker_rate_Bps": round(via_broker), "copy_rate_over_broker": round(copy_rate / via_broker, 6),
        "throughput_before": round(before, 2), "throughput_after": round(after, 2),
        "throughput_after_promotion": round(after_promotion, 2),
        "throughput_min_during": min((tp.ok.get(s, 0) for s in range(int(t_kill) + 1, int(restore))), default=None),
        "read_errors": tp.errors, "window_s": w, "plot": str(RESULTS / "recovery.png"), "plot_by": how,
        "targets": {"detect_le_10s": bool(detect and detect - t_kill <= 10),
                    "copy_rate_ge_half_raw": bool(raw and copy_rate / raw >= 0.5),
                    "throughput_back": after >= 0.9 * before},
    }
    emit(NAME, result)


if __name__ == "__main__":
    main()
