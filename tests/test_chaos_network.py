"""Failures on real parts (Mosquitto, a gateway, four validators co-signing area1 and its P
and R chains, storage nodes and the verifier as processes): kill -9 of random nodes and
the verifier under load (issue 6's first test), a full node that hangs with its MQTT
socket open (caught by missed audits), and a killed full node readmitted after it returns."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
from collections import Counter

from aggregator.reader import Reader, load_reader_config
from gridledger.testbed import storage_process, verifier_process, wait_up

from chainkit import CHAIN
from conftest import MqttProbe
from helpers import wait_until
from storagekit import _rows, certified, certified_txs, stored_txs
from test_pchain_network import p_state
from test_promotion_network import Bed, p_roles, read_loop
from test_storage_network import _settled


def p_records(db) -> list[dict]:
    """Every record in the certified P-chain blocks of a replica, in chain order."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT t.data FROM chain_txs t JOIN chain_blocks b USING (height) "
                            "WHERE b.cert IS NOT NULL ORDER BY t.height, t.idx").fetchall()
    return [json.loads(bytes(r[0])) for r in rows]


def doubled_receipts(records: list[dict]) -> list[tuple]:
    """Receipts recorded while the same node's receipt of the block still counted. A node
    may receipt a block again only after its receipt was dropped: it died (promote) or
    the block moved off it (replace)."""
    counting, doubled = set(), []
    for r in records:
        if r["kind"] == "receipt":
            key = (r["receipt"]["height"], r["receipt"]["node"])
            if key in counting:
                doubled.append(key)
            counting.add(key)
        elif r["kind"] == "promote":
            counting = {k for k in counting if k[1] != r["dead"]}
        elif r["kind"] == "replace":
            counting.discard((r["height"], r["old"]))
    return doubled


def restart(b: Bed, name: str, n: int) -> None:
    log = b.bed.tmp / (f"verifier-{n}.log" if name == "verifier" else f"storage-{name}-{n}.log")
    b.procs[name] = (verifier_process(b.layout.verifier, log) if name == "verifier"
                     else storage_process(b.layout.configs[name], log))
    wait_up(log, b.procs[name])


def events(b: Bed, prefix: str, ev: str) -> list[dict]:
    """`ev` events of every log of a process (its restarts too), in file order."""
    out = []
    for p in sorted(b.bed.tmp.glob(f"{prefix}*.log")):
        out += [json.loads(line) for line in p.read_text().splitlines() if f'"ev": "{ev}"' in line]
    return out


def short_of_target(b: Bed, chain: dict[int, str]) -> list:
    """What keeps the certified area blocks from their replication target: every block
    stored on the certified P chain, every full node among its nodes, every chosen node
    receipted and holding a body equal to the gateway's. Empty when there."""
    roles = p_roles(b.p_db, b.genesis)
    _, leaves = p_state(b.p_db, chain)
    if roles is None or len(leaves) != len(chain):
        return [("placed", len(leaves), len(chain))]
    short = []
    for h, leaf in leaves.items():
        if not (leaf["stored"] and leaf["hash"] == chain[h] and set(roles.full) <= set(leaf["nodes"])
                and set(leaf["nodes"]) <= set(leaf["receipted"])
                and len(leaf["nodes"]) == len(roles.full) + b.genesis.replicas):
            short.append((h, roles.full, leaf["nodes"], leaf["receipted"], leaf["stored"]))
    held = {n: b.held(n) for leaf in leaves.values() for n in leaf["nodes"]}
    short += [(h, n, "not held") for h, leaf in leaves.items() for n in leaf["nodes"] if held[n].get(h) != chain[h]]
    return short


def at_target(b: Bed, chain: dict[int, str]) -> bool:
    return not short_of_target(b, chain)


def wait_at_target(b: Bed, chain: dict[int, str], timeout: float, what: str, also=lambda: True) -> None:
    try:
        wait_until(lambda: also() and at_target(b, chain), timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {short_of_target(b, chain)[:8]} roles {p_roles(b.p_db, b.genesis)}") from None


CHAOS = {"f1": "full", "f2": "full", "h1": "heavy", "h2": "heavy", "l1": "light", "l2": "light"}


async def test_random_kill_9_of_storage_nodes_and_the_verifier_under_load_heals_and_reads_stay_verified(
        tmp_path, broker):
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 32)))
    print(f"CHAOS_SEED={seed}")                           # replay a failure with this seed
    rng = random.Random(seed)
    b = Bed(tmp_path, broker, CHAOS)
    kills: list[tuple[str, float]] = []
    try:
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            await b.start(probe, rounds=2)
            settings, mqtt = load_reader_config(b.layout.reader)
            results, stop, truth = [], asyncio.Event(), {"txs": certified_txs(b.bed)}
            async with Reader(settings, mqtt) as reader:
                reading = asyncio.create_task(read_loop(reader, lambda: truth["txs"], stop, results))
                loading = asyncio.create_task(b.load.send(12))
                verifier_at = rng.randrange(1, 4)        # one of the first three victims is the verifier
                for n in range(1, 6):
                    await asyncio.sleep(rng.uniform(0.5, 2.5) if n < 5 else rng.uniform(0.0, 0.5))
                    if n == 4:                            # a full node, left dead: a promotion
                        # once the earlier victims are readmitted, so that the certified full set is current
                        await asyncio.to_thread(wait_until, lambda: not p_roles(b.p_db, b.genesis).dead, 30,
                                                f"earlier victims readmitted (seed {seed}, kills {kills})")
                        victim = dead = rng.choice(sorted(p_roles(b.p_db, b.genesis).full))
                    elif n in (verifier_at, 5):           # 5: the verifier again, mid-promotion
                        victim = "verifier"
                    else:
                        victim = rng.choice(sorted(b.procs))
                    kills.append((victim, round(rng.uniform(0.5, 3.0), 2)))
                    print(f"kill -9 {victim}, back after {kills[-1][1]} s")
                    b.procs.pop(victim).send_signal(signal.SIGKILL)
                    if n != 4:
                        await asyncio.sleep(kills[-1][1])
                        await asyncio.to_thread(restart, b, victim, n)
                    truth["txs"] = certified_txs(b.bed)
                await asyncio.wait_for(loading, 60)
                await b.load.send(2)                      # blocks the dead full node never saw
                chain = _settled(b.bed, b.load.sent)
                truth["txs"] = certified_txs(b.bed)
                await asyncio.to_thread(wait_at_target, b, chain, 60, f"replication target (seed {seed}, kills {kills})",
                                        lambda: dead in p_roles(b.p_db, b.genesis).dead)
                stop.set()
                await reading
        roles = p_roles(b.p_db, b.genesis)
        assert dead in roles.dead and len(roles.full) == 2, (roles, kills)
        _, leaves = p_state(b.p_db, chain)
        txs = certified_txs(b.bed)
        for n in {n for leaf in leaves.values() for n in leaf["nodes"]}:   # each holder's copy verifies
            mine = stored_txs(b.bed.tmp / "storage" / f"{n}.db")
            assert all(mine[h] == txs[h] for h, leaf in leaves.items() if n in leaf["nodes"]), n
        assert results and not [r for r in results if r[0] == "WRONG"], (seed, results)
        assert sum(r[0] == "ok" for r in results) >= 10, (seed, Counter(results))
        # the verifier's restarts lost and doubled nothing: one placement per block, one receipt per node
        records = p_records(b.p_db)
        placements = Counter(r["height"] for r in records if r["kind"] == "placement")
        assert placements == Counter(set(chain)), (seed, placements)
        assert not doubled_receipts(records), (seed, doubled_receipts(records))
        assert not events(b, "verifier", "record_refused"), seed
        with sqlite3.connect(f"file:{tmp_path / 'verifier.db'}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT COUNT(*) FROM p_queue WHERE status != 'certified'").fetchone()[0] == 0
    finally:
        b.cleanup()


FIVE = {"f1": "full", "f2": "full", "h1": "heavy", "h2": "heavy", "l1": "light"}


async def test_a_full_node_that_hangs_with_its_socket_open_is_declared_dead_by_missed_audits_replaced_and_readmitted(
        tmp_path, broker):
    b = Bed(tmp_path, broker, FIVE)
    try:
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            chain = await b.start(probe, rounds=2)
            b.procs["f1"].send_signal(signal.SIGSTOP)      # no last will: the broker still sees it connected
            await b.load.send(2)
            chain = _settled(b.bed, b.load.sent)

            def promoted():
                roles = p_roles(b.p_db, b.genesis)
                return roles is not None and "f1" in roles.dead and len(roles.full) == 2
            await asyncio.to_thread(wait_until, promoted, 40, "f1 dead and a heavy node promoted")
        dead = events(b, "verifier", "dead")
        assert dead and dead[0]["node"] == "f1" and dead[0]["via"] == "missing" and dead[0]["r_height"] >= 1, dead
        promote = [r for r in p_records(b.p_db) if r["kind"] == "promote"]
        assert len(promote) == 1 and promote[0]["dead"] == "f1" and promote[0]["evidence"]["via"] == "missing"
        missing = [e for e in events(b, "verifier", "audit") if e["node"] == "f1"][-3:]
        assert [e["outcome"] for e in missing] == ["missing"] * 3, missing
        new = promote[0]["new"]
        wait_at_target(b, chain, 40, "two full replicas of every block again")
        assert b.held(new) == chain
        b.procs["f1"].send_signal(signal.SIGCONT)          # it wakes up, still connected: no "alive" news
        wait_until(lambda: not p_roles(b.p_db, b.genesis).dead, 30, "f1 readmitted on the certified P chain")
        readmit = [r for r in p_records(b.p_db) if r["kind"] == "readmit"]
        assert len(readmit) == 1 and readmit[0]["node"] == "f1"
    finally:
        b.cleanup()


async def test_a_killed_full_node_that_comes_back_is_readmitted_as_heavy_after_catching_up(tmp_path, broker):
    b = Bed(tmp_path, broker, FIVE, audits=False)
    try:
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            await b.start(probe, rounds=2)
            b.procs.pop("f1").send_signal(signal.SIGKILL)
            wait_until(lambda: "f1" in (p_roles(b.p_db, b.genesis) or Roles0).dead, 20, "f1 recorded dead")
            await b.load.send(3)                          # blocks f1 has not seen
            chain = _settled(b.bed, b.load.sent)
        await asyncio.to_thread(restart, b, "f1", 1)
        wait_until(lambda: not p_roles(b.p_db, b.genesis).dead, 30, "f1 readmitted on the certified P chain")
        readmit = [r for r in p_records(b.p_db) if r["kind"] == "readmit"]
        assert len(readmit) == 1 and readmit[0]["node"] == "f1" and readmit[0]["evidence"]["height"] >= max(chain)
        roles = p_roles(b.p_db, b.genesis)
        assert "f1" not in roles.full and roles.kind_of(b.genesis, "f1") == "heavy"
        assert _rows(b.bed.tmp / "storage" / "f1.db", "SELECT height, hash FROM storage_headers") == certified(b.bed)
        wait_at_target(b, chain, 30, "every block at its replication target")
    finally:
        b.cleanup()


class Roles0:
    dead = ()
