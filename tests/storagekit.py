"""Builders for storage tests: a certified chain made in process (storage nodes do
not re-run apps, so synthetic transactions under real BLS certificates are enough),
and storage node processes beside a `chainkit.ChainBed`."""

from __future__ import annotations

import json
import signal
import sqlite3
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from aggregator.bodyfile import HEAD
from aggregator.storagestore import StorageStore, body_file_path
from certlog import bls, merkle
from certlog.block import ZERO_HASH, Certificate, Header, cert_message
from certlog.validators import ValidatorSet, read_secret_key
from gridledger.testbed import storage_process, wait_up, write_storage_node

from chainkit import CHAIN, chain_bodies, validator_keys, validator_set


@dataclass
class Block:
    header: Header
    cert: Certificate
    txs: list[bytes]


def sign(sks: list[int], header: Header, signers=(0, 1, 2)) -> Certificate:
    """A certificate of `header` signed by the validators `signers` (indices into `sks`)."""
    msg = cert_message(header.chain, header.height, header.hash)
    return Certificate(header.chain, header.height, header.hash, tuple(signers),
                       bls.Aggregate([bls.Sign(sks[i], msg) for i in signers]))


def make_chain(blocks: int, txs_per_block: int = 5, *, chain: str = CHAIN, tx_bytes: int = 60,
               sks: list[int] | None = None) -> tuple[list[Block], ValidatorSet, list[int]]:
    """`blocks` certified blocks of `chain` (4 validators, 3 signing each)."""
    sks = sks or validator_keys(4)
    out, prev = [], ZERO_HASH
    for h in range(1, blocks + 1):
        txs = [f'{{"block":{h},"i":{i},"pad":"{"x" * tx_bytes}"}}'.encode() for i in range(txs_per_block)]
        header = Header(chain=chain, height=h, prev=prev, time=1_000 * h, tx_root=merkle.root(txs),
                        state_root="0" * 64, txs=len(txs), app={})
        out.append(Block(header, sign(sks, header), txs))
        prev = header.hash
    return out, validator_set(sks), sks


class StorageNodes:
    """Storage node processes beside a `ChainBed` (same folder, broker and validator set)."""

    def __init__(self, bed):
        self.bed = bed
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, kind: str = "full", peers=(), **options) -> None:
        b = self.bed
        cfg = write_storage_node(b.tmp, name, kind=kind, chain=CHAIN, host=b.broker.host, port=b.broker.port,
                                 peers=list(peers), **{"catchup_s": 1.0, "timeout_s": 2.0, **options})
        log = self.log_path(name)
        self.procs[name] = storage_process(cfg, log)
        wait_up(log, self.procs[name])

    def log_path(self, name: str) -> Path:
        return self.bed.tmp / f"storage-{name}.log"

    def log(self, name: str) -> str:
        p = self.log_path(name)
        return p.read_text() if p.exists() else ""

    def events(self, name: str, ev: str) -> list[dict]:
        return [json.loads(line) for line in self.log(name).splitlines() if f'"ev": "{ev}"' in line]

    def public_key(self, name: str) -> bytes:
        return bls.SkToPk(read_secret_key(self.bed.tmp / "storage" / f"{name}.bls.key"))

    def db(self, name: str) -> Path:
        return self.bed.tmp / "storage" / f"{name}.db"

    def held(self, name: str) -> dict[int, str]:
        """height -> header hash of every body the node holds (read-only)."""
        return _rows(self.db(name), "SELECT h.height, h.hash FROM storage_headers h JOIN storage_bodies b "
                                    "USING (height) ORDER BY h.height")

    def headers(self, name: str) -> dict[int, str]:
        return _rows(self.db(name), "SELECT height, hash FROM storage_headers ORDER BY height")

    def txs(self, name: str) -> dict[int, list[bytes]]:
        return stored_txs(self.db(name))

    def inventory(self, name: str) -> str:
        """`gridledger storage inventory` of a node: its JSON line."""
        out = subprocess.run([sys.executable, "-m", "gridledger", "storage", "inventory", "--config",
                              str(self.bed.tmp / "storage" / f"{name}.toml")], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    def status(self, name: str) -> dict:
        """Stop the node (SIGTERM) and return the counters it logs on the way out."""
        self.stop(name)
        return self.events(name, "stop")[-1]

    def stop(self, name: str, sig=signal.SIGTERM) -> None:
        p = self.procs.pop(name)
        p.send_signal(sig)
        p.wait(20)

    def cleanup(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def certified(bed) -> dict[int, str]:
    """height -> hash of every certified block in the gateway's store."""
    return _rows(bed.db(), "SELECT height, hash FROM chain_blocks WHERE cert IS NOT NULL ORDER BY height")


def certified_txs(bed) -> dict[int, list[bytes]]:
    """height -> body of every block in the gateway's store (certified or not)."""
    return chain_bodies(bed.db(), certified_only=False)


def _rows(db: Path, sql: str) -> dict:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return dict(conn.execute(sql).fetchall())
    except sqlite3.OperationalError:
        return {}


def stored_txs(db: Path) -> dict[int, list[bytes]]:
    """height -> transactions of every body a storage node holds and reads back whole
    (read-only: the node may be running)."""
    store = StorageStore(conn=sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5))
    try:
        return {h: txs for h in store.body_heights() if (txs := store.body(h)) is not None}
    finally:
        store.close()


def flip_body_byte(db: Path, height: int, at: float = 0.5, *, tx: int | None = None) -> int:
    """Flip one byte of the body record of `height` in a node's body file, `at` (0..1)
    of the way into its payload, or into transaction `tx` of it (the node stopped or
    not); the file offset flipped."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        off, size, toffs = conn.execute("SELECT off, len, toffs FROM storage_bodies WHERE height = ?",
                                        (height,)).fetchone()
    if tx is None:
        pos = off + HEAD.size + min(size - 1, int(size * at))
    else:
        starts = list(struct.unpack(f">{len(toffs) // 4}I", toffs)) + [size + 4]
        pos = off + HEAD.size + starts[tx] + int((starts[tx + 1] - 4 - starts[tx]) * at)
    with open(body_file_path(db), "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))
    return pos
