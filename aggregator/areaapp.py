"""The area-chain app: verified readings and alerts -> account states in an MPT.

State is Ethereum's Merkle Patricia Trie (`trie`), keyed by SHA-256 of the
account id. A leaf is RLP of

    [meter, seq, latest reading hash, reading count, last t, running encrypted total]

where the running total is the product mod n^2 of every ciphertext the account
ever produced (DESIGN section 3), so a bill over a period is two leaves away.

A reading transaction is the reading's canonical JSON (`Reading.to_json`); an
alert is canonical JSON with an "alert" field. Everything is recomputed from the
transactions alone: signatures, registry membership, key id, ciphertext range,
seq and prev continuity, time order, roots and totals. The header carries the
block's encrypted area total and its counts.

Meter replacement: when a registered meter of the account starts a fresh chain
(seq 1, prev all zeros), the account follows it; count and total continue.

The registry is either a static file (the header carries its digest) or the
registry chain (`coordinator.registryapp`). With the chain, membership is
judged at an exact registry height R kept in the state: a block that moves R
starts with a registry transaction `{"registry": {"hash", "height"}}` naming a
certified registry header; R never goes back, so a retired meter stays out.
The header carries R and that header's hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import MutableMapping, Sequence

import gmpy2
import rlp
from trie import HexaryTrie

from certlog.app import InvalidBlock, Outcome
from certlog.block import canonical
from gridledger.errors import Rejected
from gridledger.paillier import PublicKey
from gridledger.wire import ZERO_HASH, Reading, parse_reading

from coordinator.registryapp import RegistryHistory

from .registry import Registry

__all__ = ["AreaApp", "AccountState", "account_key", "equivocation_alert", "registry_digest",
           "registry_tx", "MAX_FUTURE_S"]

MAX_FUTURE_S = 300  # a reading may end at most this long after its block's time
GENESIS_ROOT = HexaryTrie.BLANK_NODE_HASH.hex()
REGISTRY_KEY = hashlib.sha256(b"\0registry").digest()  # no account id contains NUL
NO_REGISTRY = (0, "0" * 64)


def account_key(account: str) -> bytes:
    return hashlib.sha256(account.encode()).digest()


def registry_digest(registry: Registry) -> str:
    rows = sorted([e.meter, e.account, e.public_key] for e in registry)
    return hashlib.sha256(canonical(rows)).hexdigest()


@dataclass(slots=True)
class AccountState:
    meter: str
    seq: int
    hash: str
    count: int
    last_t: int
    total: int  # product of the account's ciphertexts mod n^2; 1 (= E(0), r = 1) at first

    def encode(self) -> bytes:
        return rlp.encode([self.meter.encode(), self.seq, bytes.fromhex(self.hash), self.count,
                           self.last_t, self.total])

    @classmethod
    def decode(cls, data: bytes) -> "AccountState":
        meter, seq, h, count, last_t, total = rlp.decode(data)
        n = lambda b: int.from_bytes(b, "big")  # noqa: E731
        return cls(meter.decode(), n(seq), h.hex(), n(count), n(last_t), n(total))


def registry_tx(height: int, header_hash: str) -> bytes:
    """The transaction that moves an area chain to registry height `height`."""
    return canonical({"registry": {"hash": header_hash, "height": height}})


def equivocation_alert(a: Reading, b: Reading) -> bytes:
    """Alert transaction: two validly signed readings of one meter at one seq."""
    pair = sorted([a.to_json().decode(), b.to_json().decode()])
    return canonical({"alert": "equivocation", "meter": a.meter, "seq": a.seq, "readings": pair})


class AreaApp:
    name = "area"
    genesis_root = GENESIS_ROOT

    def __init__(self, area: str, registry: Registry | RegistryHistory, paillier: PublicKey):
        self.area = area
        self.registry = registry
        self.paillier = paillier
        self.chained = isinstance(registry, RegistryHistory)
        self.registry_digest = None if self.chained else registry_digest(registry)
        self._kid = paillier.kid  # derived values, computed once: they are per-reading checks
        self._n = gmpy2.mpz(paillier.n)
        self._nsq = gmpy2.mpz(paillier.nsquare)

    def execute(self, nodes: MutableMapping[bytes, bytes], parent_root: str, time_ms: int,
                txs: Sequence[bytes], *, trusted: bool = False) -> Outcome:
        trie = HexaryTrie(nodes, root_hash=bytes.fromhex(parent_root))
        accounts: dict[str, AccountState] = {}
        block_total = gmpy2.mpz(1)
        readings = alerts = 0
        ref = start = self.registry_ref(trie)
        reg = self.registry.view(self.area, ref[0]) if self.chained else self.registry
        for i, tx in enumerate(txs):
            if tx.startswith(b'{"alert"'):
                self._alert(i, tx, reg)
                alerts += 1
                continue
            if tx.startswith(b'{"registry"'):
                ref = self._advance(i, tx, ref)
                reg = self.registry.view(self.area, ref[0])
                continue
            r = self._reading(i, tx, trusted, reg)
            account = reg.get(r.meter).account
            st = accounts.get(account)
            if st is None:
                leaf = trie.get(account_key(account))
                st = accounts[account] = (AccountState.decode(leaf) if leaf else
                                          AccountState(r.meter, 0, ZERO_HASH, 0, 0, 1))
            self._chain(i, r, st, time_ms)
            c = gmpy2.mpz(r.ciphertext)
            st.total = int(gmpy2.f_mod(st.total * c, self._nsq))
            block_total = gmpy2.f_mod(block_total * c, self._nsq)
            readings += 1
        for account in sorted(accounts):
            trie.set(account_key(account), accounts[account].encode())
        if ref != start:
            trie.set(REGISTRY_KEY, rlp.encode([ref[0], bytes.fromhex(ref[1])]))
        fields = {"registry": ref[1], "registry_height": ref[0]} if self.chained else {
            "registry": self.registry_digest}
        return Outcome(trie.root_hash.hex(), {
            "area": self.area, "kid": self._kid, **fields,
            "readings": readings, "alerts": alerts, "total": format(int(block_total), "x")})

    def registry_ref(self, trie: HexaryTrie) -> tuple[int, str]:
        """The registry height and header hash the state at `trie` judges membership by."""
        if not self.chained:
            return NO_REGISTRY
        raw = trie.get(REGISTRY_KEY)
        if not raw:
            return NO_REGISTRY
        height, h = rlp.decode(raw)
        return int.from_bytes(height, "big"), h.hex()

    def _advance(self, i: int, tx: bytes, ref: tuple[int, str]) -> tuple[int, str]:
        try:
            obj = json.loads(tx)["registry"]
            height, h = obj["height"], obj["hash"]
            ok = (self.chained and canonical({"registry": obj}) == tx and set(obj) == {"hash", "height"}
                  and type(height) is int and isinstance(h, str))
        except (ValueError, KeyError, TypeError, RecursionError):
            ok = False
        if not ok:
            raise InvalidBlock("tx_bad_registry", "not a canonical registry reference", index=i)
        if height <= ref[0]:
            raise InvalidBlock("tx_registry_backwards", f"registry height {height} after {ref[0]}", index=i)
        if height > self.registry.height:
            # Not the block's fault: this replica has not yet seen that registry block.
            raise InvalidBlock("registry_behind", f"registry height {height}, have {self.registry.height}")
        if self.registry.hash_at(height) != h:
            raise InvalidBlock("tx_registry_mismatch", f"not the certified registry header at {height}", index=i)
        return height, h

    def _reading(self, i: int, tx: bytes, trusted: bool, reg) -> Reading:
        try:
            r = parse_reading(tx)
        except Rejected as exc:
            raise InvalidBlock("tx_" + exc.reason, exc.detail, index=i) from None
        if r.to_json() != tx:
            raise InvalidBlock("tx_not_canonical", "a reading tx is its canonical JSON", index=i)
        if r.meter not in reg:
            raise InvalidBlock("tx_unknown_meter", r.meter, index=i)
        if r.kid != self._kid:
            raise InvalidBlock("tx_unknown_key_id", r.kid, index=i)
        c = r.ciphertext
        if not (0 < c < self._nsq and gmpy2.gcd(c, self._n) == 1):
            raise InvalidBlock("tx_ciphertext_range", "c is not a unit below n^2", index=i)
        if not trusted and not reg.verify(r.meter, r.signed_bytes, bytes.fromhex(r.sig)):
            raise InvalidBlock("tx_bad_signature", f"{r.meter} seq {r.seq}", index=i)
        return r

    @staticmethod
    def _chain(i: int, r: Reading, st: AccountState, time_ms: int) -> None:
        if r.meter != st.meter or st.seq == 0:
            if r.seq != 1 or r.prev != ZERO_HASH:
                raise InvalidBlock("tx_seq_gap" if r.meter == st.meter else "tx_meter_switch",
                                   f"{r.meter} must start at seq 1 with a zero prev", index=i)
        elif r.seq != st.seq + 1:
            raise InvalidBlock("tx_seq_gap", f"{r.meter}: expected seq {st.seq + 1}, got {r.seq}", index=i)
        elif r.prev != st.hash:
            raise InvalidBlock("tx_prev_mismatch", f"{r.meter} seq {r.seq}", index=i)
        if r.t - r.dt < st.last_t or r.t * 1000 > time_ms + MAX_FUTURE_S * 1000:
            raise InvalidBlock("tx_clock_skew", f"{r.meter} seq {r.seq}: t {r.t}", index=i)
        st.meter, st.seq, st.hash, st.last_t = r.meter, r.seq, r.hash, r.t
        st.count += 1

    def _alert(self, i: int, tx: bytes, reg) -> None:
        try:
            obj = json.loads(tx)
            a, b = (parse_reading(s.encode()) for s in obj["readings"])
            ok = (canonical(obj) == tx and obj["alert"] == "equivocation" and set(obj) == {
                  "alert", "meter", "seq", "readings"} and obj["readings"][0] < obj["readings"][1]
                  and a.meter == b.meter == obj["meter"] and a.seq == b.seq == obj["seq"])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, Rejected):
            ok = False
        if not ok:
            raise InvalidBlock("tx_bad_alert", "not a canonical equivocation alert", index=i)
        if a.meter not in reg:
            raise InvalidBlock("tx_unknown_meter", a.meter, index=i)
        for r in (a, b):
            if not reg.verify(r.meter, r.signed_bytes, bytes.fromhex(r.sig)):
                raise InvalidBlock("tx_bad_alert", "an alert reading's signature does not verify", index=i)
