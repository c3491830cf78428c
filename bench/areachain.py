"""Big, real area chains built fast for the benches (bench/query.py, bench/settle.py).

Every block is real: canonical wire-v1 readings signed with each meter's Ed25519
key and hash-chained by `prev`; the state computed by the chain's own app
(`execute(trusted=True)`: the signatures are not re-checked while building);
the header with the real Merkle and MPT roots and a BLS certificate of 3 of 4
validators; the area chain indexed by `AreaLedger.index` as a follower would.
What is skipped is only the network and the validators' re-execution.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Callable, Sequence

from aggregator.areaapp import AreaApp
from aggregator.registry import MeterEntry, Registry
from certlog import bls, merkle
from certlog.block import ZERO_HASH, Certificate, Header, cert_message
from certlog.store import ChainStore, connect
from certlog.validators import ValidatorSet, info_for
from coordinator.ledger import AreaLedger
from gridledger.meterkeys import MeterKey
from gridledger.paillier import PublicKey
from gridledger.wire import Reading, kid_of, signed_bytes

AREA = "A"
DT = 900


def meter_id(i: int) -> str:
    return f"bm{i:05d}"


def account_id(i: int) -> str:
    return f"acct-{i:05d}"


def validators() -> tuple[list[int], ValidatorSet]:
    sks = [bls.KeyGen(hashlib.sha256(b"bench validator %d" % i).digest()) for i in range(4)]
    return sks, ValidatorSet([info_for(f"v{i}", sk) for i, sk in enumerate(sks)])


def meter_key(i: int) -> MeterKey:
    return MeterKey(meter_id(i), hashlib.sha256(b"bench meter %d" % i).digest())


def open_store(path: Path) -> ChainStore:
    """A ledger's SQLite file (8 KiB pages), tuned for a generated cache: a crash may
    tear it, and then it is rebuilt."""
    conn = connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    return ChainStore(conn)


def certify_block(store: ChainStore, app, sks: Sequence[int], chain: str, head: Header | None, txs: list[bytes],
                  time_ms: int, *, decoded: Sequence[object] | None = None,
                  also: Callable[[sqlite3.Connection], None] | None = None) -> Header:
    """Execute `txs` on top of `head`, certify the header with 3 of the 4 `sks` and
    store the block (and whatever `also` writes, in the same transaction)."""
    out = app.execute(store.nodes, head.state_root if head else app.genesis_root, time_ms, txs, trusted=True,
                      decoded=decoded)
    header = Header(chain=chain, height=(head.height if head else 0) + 1, prev=head.hash if head else ZERO_HASH,
                    time=time_ms, tx_root=merkle.root(txs), state_root=out.state_root, txs=len(txs), app=out.app)
    msg = cert_message(chain, header.height, header.hash)
    cert = Certificate(chain, header.height, header.hash, (0, 1, 2), bls.Aggregate([bls.Sign(sk, msg) for sk in sks[:3]]))
    with store.transaction() as c:
        store.put_block(header, txs, cert)
        if also is not None:
            also(c)
    store.nodes.cache.clear()  # a replica's node cache keeps everything; here a block's worth
    return header


class AreaChain:
    """An area chain of `accounts` meters (meter i is account i's only meter) under
    the Paillier modulus `n`, stored and indexed in `path`; blocks are appended
    with `commit` from readings made with `reading`."""

    def __init__(self, path: Path, n: int, accounts: int):
        self.n = n
        self.nsq = n * n
        self.kid = kid_of(n)
        self.keys = [meter_key(i) for i in range(accounts)]
        self.registry = Registry([MeterEntry(k.meter, account_id(i), k.public_hex) for i, k in enumerate(self.keys)])
        self.app = AreaApp(AREA, self.registry, PublicKey(n))
        self.sks, self.vset = validators()
        self.store = open_store(path)
        self.ledger = AreaLedger(self.store, AREA, registry=self.registry)
        head = self.store.head()
        self.head = head[0] if head else None
        self.prev = [ZERO_HASH] * accounts   # each meter's last reading: its hash and seq
        self.seq = [0] * accounts

    @property
    def height(self) -> int:
        return self.head.height if self.head else 0

    def reading(self, i: int, t: int, c: str) -> Reading:
        """Meter i's next reading, ending at `t`, with ciphertext `c` (hex)."""
        key, seq = self.keys[i], self.seq[i] + 1
        sig = key.sign(signed_bytes(key.meter, seq, t, DT, self.prev[i], self.kid, c)).hex()
        r = Reading(meter=key.meter, seq=seq, t=t, dt=DT, prev=self.prev[i], kid=self.kid, c=c, sig=sig)
        self.prev[i], self.seq[i] = r.hash, seq
        return r

    def commit(self, readings: list[Reading], time_ms: int,
               also: Callable[[sqlite3.Connection], None] | None = None) -> Header:
        txs = [r.to_json() for r in readings]
        header = certify_block(self.store, self.app, self.sks, AREA, self.head, txs, time_ms, decoded=readings,
                               also=also)
        self.ledger.index(header, txs)
        self.head = header
        return header
