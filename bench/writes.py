"""Bytes a gateway writes to its disk per block, against the bytes of the data itself:
on a Raspberry Pi that disk is usually an SD card, and what wears it is what is written.

The real gateway is built from the files a deployment reads and fed blocks of 1,000
readings in one process, without MQTT (as bench/stages.py): `Gateway._process` (checks,
the readings' SQLite commit), `AreaChain._prepare` (the trusted app run, its trie nodes,
the durable proposal) and the certified block's commit. Written bytes are the process's
`wchar` (/proc/self/io: every write and pwrite, WAL frames and checkpoints included),
which is what reaches the page cache and, after fsync, the card.

The baseline, measured in the same run, is the data: each block's body (the readings'
canonical JSON) plus the bytes of the trie nodes the block adds. The ratio is written
bytes over those. The readings are kept twice by design (the gateway's readings table
and the block body), and SQLite's WAL writes every page twice (log, then checkpoint),
so 4x is where a store that wrote each page once would sit; beyond it is page
granularity: a trie node (300-600 bytes) inserted at a random key dirties a whole page.

`--meters M`: M meters, one reading each per block when M >= 1,000 (a real area: a
meter reads every 15 minutes, a block holds 1,000 readings), five each with the
default 200 (bench/ingest.py's shape). Per day, a meter makes 96 readings."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from types import SimpleNamespace

from aggregator.gateway import BATCH_MAX, Gateway, load_gateway_config
from aggregator.validator import build_node, load_validator_config
from certlog.proposer import Proposer
from certlog.store import NodeDB

from benchlib import emit, load_test_modulus, machine
from certify import AREA, FixedRhos, load_meters, meter_keys, write_area
from stages import CountingLink

NAME = "writes"
BLOCK = 1000
READINGS_PER_DAY = 96  # one every 15 minutes


def written_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


class NodeBytes:
    """Counts the trie nodes (and their bytes) NodeDB.flush writes, around the real flush."""

    def __init__(self) -> None:
        self.nodes = self.bytes = 0
        self._flush = NodeDB.flush
        counter = self

        def flush(db: NodeDB) -> None:
            counter.nodes += len(db.pending)
            counter.bytes += sum(len(v) for v in db.pending.values())
            counter._flush(db)

        NodeDB.flush = flush

    def close(self) -> None:
        NodeDB.flush = self._flush


def run(wd: Path, meters: int, blocks: int, warmup: int) -> list[dict]:
    n = load_test_modulus()
    keys = meter_keys(meters)
    per_meter = max(1, BLOCK // meters)
    total = per_meter * meters  # readings per round over all meters
    rounds = -(-(blocks + warmup) * BLOCK // total)
    sources = load_meters(keys, n, per_meter * rounds)
    rhos = FixedRhos(n)
    configs = write_area(wd, keys, n, SimpleNamespace(host="127.0.0.1", port=1), 1)
    gw = Gateway(load_gateway_config(wd / "gateway.toml"))
    node = build_node(load_validator_config(configs[0]))[0]

    async def publish(topic: str, payload: bytes) -> None:
        pass

    chain = gw.chain
    chain.proposer = Proposer(chain.replica, publish, chain._sk)
    gw.readings = CountingLink()
    # Readings in the order meters make them: round by round, each meter in turn.
    stream = ((m, r) for _ in range(rounds) for r in range(per_meter) for m in sources)
    counter = NodeBytes()
    loop = asyncio.new_event_loop()
    out = []
    try:
        for b in range(warmup + blocks):
            readings = [m.next(rhos) for m, _ in (next(stream) for _ in range(BLOCK))]
            msgs = [(f"gl/v1/{AREA}/meters/{r.meter}/readings", r.to_json()) for r in readings]
            counter.nodes = counter.bytes = 0
            w0 = written_bytes()
            for i in range(0, len(msgs), BATCH_MAX):
                loop.run_until_complete(gw._process(msgs[i:i + BATCH_MAX]))
            prepared = chain._prepare()
            if prepared is None or prepared[0].txs != BLOCK:
                raise AssertionError(f"block does not hold the {BLOCK} readings: {prepared}")
            header, txs = prepared
            cert = chain.replica.validators.aggregate([node.voter.sign(header)])
            chain.replica.commit(header, txs, cert, stored=True)
            if b >= warmup:
                out.append({"written": written_bytes() - w0, "body": sum(map(len, txs)),
                            "nodes": counter.nodes, "node_bytes": counter.bytes})
    finally:
        counter.close()
        loop.close()
        gw.store.close()
        chain.close()
        node.replica.store.conn.close()
    if gw.ingest.counts["accept"] != BLOCK * (warmup + blocks):
        raise AssertionError(f"not every reading was accepted: {dict(gw.ingest.counts)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer blocks")
    ap.add_argument("--meters", type=int, default=1000, help="meters in the area (default 1,000)")
    args = ap.parse_args()
    if args.meters < 1:
        raise SystemExit("--meters must be at least 1")
    # Warm-up: the first blocks fill an empty trie and a fresh file; a running area's
    # blocks update accounts that exist. Every meter has read once before the count.
    warmup = max(2, -(-args.meters // BLOCK) + 1)
    blocks = 4 if args.quick else 10
    with tempfile.TemporaryDirectory(prefix="bench-writes-") as tmp:
        per_block = run(Path(tmp), args.meters, blocks, warmup)

    def mean(key: str) -> float:
        return sum(b[key] for b in per_block) / len(per_block)

    # Means, not medians: every second block or so also checkpoints the WAL into the
    # database (writing its pages a second time), and the card wears by the total.
    written, body, node_bytes = mean("written"), mean("body"), mean("node_bytes")
    per_reading = written / BLOCK
    emit(NAME if args.meters == 1000 else f"{NAME}_{args.meters}_meters", {
        "bench": NAME,
        "quick": args.quick,
        "meters": args.meters,
        "readings_per_block": BLOCK,
        "blocks": len(per_block),
        "warmup_blocks": warmup,
        "written_mb_per_block": round(written / 1e6, 2),
        # Block by block: the node table grows, and with it the pages a block's nodes land on.
        "written_mb_each_block": [round(b["written"] / 1e6, 2) for b in per_block],
        "written_bytes_per_reading": round(per_reading),
        "body_mb_per_block": round(body / 1e6, 2),
        "trie_nodes_per_block": round(mean("nodes")),
        "trie_node_mb_per_block": round(node_bytes / 1e6, 2),
        # The baseline: the data itself, once (the block's readings and its new trie nodes).
        "data_mb_per_block": round((body + node_bytes) / 1e6, 2),
        "ratio_written_to_data": round(written / (body + node_bytes), 2),
        # What the area writes in a day at 96 readings per meter.
        "written_gb_per_day": round(per_reading * READINGS_PER_DAY * args.meters / 1e9, 2),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
