"""A promoted node's fill alone: the copy rate of recovery without the rest of the testbed.

Two full storage nodes (real processes on a real Mosquitto) hold a certified chain of
`BLOCKS` blocks; a heavy node that holds every header and none of the bodies is
promoted (`{"role": "full"}`, as the verifier sends it) and fills itself from both,
checking every body against its certified header, keeping it durably and signing
receipts, exactly as in bench/recovery.py, but with nothing else running: no gateway,
validators, reader or loadgen on the two cores. Twice: small bodies (20 readings, as
the area chain cuts them under light load) and large ones (100 readings). Reports
per case the fill's bytes, seconds (promotion to filled), MB/s, its stages in ms/MB, and
`copy_rate_ratio` over the raw copy of the same bytes between two local processes
(the median of five, as in bench/recovery.py), with `broker_rate_Bps` beside it."""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiomqtt

from aggregator.storagestore import StorageStore
from aggregator.storagewire import StorageTopics, encode_placement
from certlog import bls, merkle
from certlog.block import ZERO_HASH, Certificate, Header, cert_message
from certlog.validators import dump_validator_set, info_for
from gridledger.broker import start_mosquitto
from gridledger.testbed import storage_process, wait_up, write_storage_node

from benchlib import emit, machine, parse_args
from certify import log_events, stop
from recovery import broker_copy_rate, per_mb, raw_copy_rates

NAME = "fill"
CHAIN = "area1"
TX_BYTES = 1350          # a reading: its 4096-bit ciphertext in hex and the rest of its JSON
CASES = {"small": 20, "large": 100}   # transactions per block
MB = {True: 8, False: 40}             # megabytes of bodies per case (--quick, full)


def make_chain(blocks: int, per_block: int, sks: list[int]) -> list[tuple[Header, Certificate, list[bytes]]]:
    """Certified blocks (3 of 4 validators) of synthetic reading-sized transactions:
    storage nodes judge a body only against its certified header, never the app."""
    out, prev = [], ZERO_HASH
    for h in range(1, blocks + 1):
        txs = [(b"%08d.%04d." % (h, i) + os.urandom(TX_BYTES // 2).hex().encode())[:TX_BYTES]
               for i in range(per_block)]
        header = Header(chain=CHAIN, height=h, prev=prev, time=1000 * h, tx_root=merkle.root(txs),
                        state_root="0" * 64, txs=len(txs), app={})
        msg = cert_message(CHAIN, h, header.hash)
        cert = Certificate(CHAIN, h, header.hash, (0, 1, 2), bls.Aggregate([bls.Sign(sks[i], msg) for i in range(3)]))
        out.append((header, cert, txs))
        prev = header.hash
    return out


def run_case(wd: Path, broker, per_block: int, megabytes: int) -> dict:
    sks = [bls.KeyGen(bytes([i + 1]) * 32) for i in range(4)]
    (wd / "validators.toml").write_text(dump_validator_set([info_for(f"v{i}", sk) for i, sk in enumerate(sks)]))
    blocks = make_chain(max(1, megabytes * 10**6 // (per_block * TX_BYTES)), per_block, sks)
    nodes = {"f1": ("full", ["f2", "h1"]), "f2": ("full", ["f1", "h1"]), "h1": ("heavy", ["f1", "f2"])}
    configs = {n: write_storage_node(wd, n, kind=k, chain=CHAIN, host=broker.host, port=broker.port, peers=p,
                                     proposer_sync=False, catchup_s=1.0, timeout_s=3.0)
               for n, (k, p) in nodes.items()}
    for n in nodes:   # the full nodes hold everything; the heavy node every header, no body
        store = StorageStore(wd / "storage" / f"{n}.db")
        for header, cert, txs in blocks:
            store.put_header(header, cert)
        if n != "h1":
            for k in range(0, len(blocks), 50):
                store.put_bodies([(header, txs) for header, _, txs in blocks[k:k + 50]])
        store.close()
    logs = {n: wd / f"storage-{n}.log" for n in nodes}
    procs = {}
    try:
        for group in (("f1", "f2"), ("h1",)):   # the peers first: h1's first round finds them answering
            procs |= {n: storage_process(configs[n], logs[n]) for n in group}
            for n in group:
                wait_up(logs[n], procs[n], 60)
        time.sleep(1.5)   # h1's first catch-up round (inventories, nothing wanted) is behind it
        asyncio.run(_promote(broker, "h1"))
        deadline = time.monotonic() + 300
        while not (filled := log_events(logs["h1"], "filled")) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not filled:
            raise RuntimeError(f"h1 did not fill within 300 s; see {logs['h1']}")
    finally:
        stop(list(procs.values()))
    f = filled[0]
    # Nothing else runs and no block arrives meanwhile: the rate is over the seconds from
    # the promotion to the last body kept (busy_s, the rounds that fetched, is beside it).
    return {"txs_per_block": per_block, "blocks": len(blocks), "bytes": f["bytes"], "busy_s": f["busy_s"],
            "seconds": f["seconds"], "rate_Bps": round(f["bytes"] / f["seconds"]),
            "cpu_ms_per_MB": round(f["cpu_s"] * 1000 / (f["bytes"] / 1e6), 2) if f.get("cpu_s") and f["bytes"] else None,
            "ms_per_MB": per_mb(f.get("stages", {}), f["bytes"])}


async def _promote(broker, node: str) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="bench-fill") as c:
        await c.publish(StorageTopics(CHAIN).store(node), encode_placement(role="full", by="bench"), qos=1)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    cases = {}
    for name, per_block in CASES.items():
        with tempfile.TemporaryDirectory(prefix=f"gl-fill-{name}-") as tmp:
            wd = Path(tmp)
            broker = start_mosquitto(wd / "broker")
            try:
                case = run_case(wd, broker, per_block, MB[args.quick])
                case["broker_rate_Bps"] = round(broker_copy_rate(broker.host, broker.port, case["bytes"]))
            finally:
                broker.stop()
        raws = raw_copy_rates(case["bytes"])
        raw = statistics.median(raws)
        case |= {"raw_rate_Bps": round(raw), "raw_rates_Bps": [round(r) for r in raws],
                 "copy_MBps": round(case["rate_Bps"] / 1e6, 2), "copy_rate_ratio": round(case["rate_Bps"] / raw, 4),
                 "copy_rate_over_broker": round(case["rate_Bps"] / case["broker_rate_Bps"], 4)}
        cases[name] = case
    emit(NAME, {"bench": NAME, "quick": args.quick, "machine": machine(), "cases": cases,
                "copy_rate_ratio": {k: c["copy_rate_ratio"] for k, c in cases.items()},
                "copy_MBps": {k: c["copy_MBps"] for k, c in cases.items()}})


if __name__ == "__main__":
    main()
