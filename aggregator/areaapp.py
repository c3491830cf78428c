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
block's encrypted area total and its counts. A validator may pass `verified`,
the signatures it already checked on the reading stream (`aggregator.preverify`):
a reading found there skips only its Ed25519 verify.

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

from certlog.app import InvalidBlock, Outcome
from certlog.block import canonical
from certlog.mpt import BLANK_ROOT, Trie, rlp_decode, rlp_encode
from gridledger.errors import Rejected
from gridledger.paillier import PublicKey
from gridledger.wire import ZERO_HASH, Reading, parse_reading, well_formed

from coordinator.registryapp import RegistryHistory, RegistryView

from .preverify import VerifiedSignatures, signature_key
from .registry import Registry

__all__ = ["AreaApp", "AccountState", "account_key", "equivocation_alert", "registry_digest",
           "registry_tx", "MAX_FUTURE_S"]

MAX_FUTURE_S = 300  # a reading may end at most this long after its block's time
GENESIS_ROOT = BLANK_ROOT.hex()
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
        """`rlp.encode` of the list above (ints big-endian, minimal), without its
        per-item type inference: every block encodes each account it touches."""
        return rlp_encode([self.meter.encode(), _uint(self.seq), bytes.fromhex(self.hash), _uint(self.count),
                           _uint(self.last_t), _uint(self.total)])

    @classmethod
    def decode(cls, data: bytes) -> "AccountState":
        try:
            items = rlp_decode(data)
            canonical_rlp = rlp_encode(items) == data
        except ValueError:
            canonical_rlp = False
        if not canonical_rlp:  # for anything unusual, the reference decoder and its errors
            items = rlp.decode(data)
        meter, seq, h, count, last_t, total = items
        n = lambda b: int.from_bytes(b, "big")  # noqa: E731
        return cls(meter.decode(), n(seq), h.hex(), n(count), n(last_t), n(total))


def _uint(x: int) -> bytes:
    if x < 0:
        raise rlp.SerializationError("Cannot serialize negative integers", x)
    return x.to_bytes((x.bit_length() + 7) // 8, "big")


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

    def __init__(self, area: str, registry: Registry | RegistryHistory, paillier: PublicKey, *,
                 verified: VerifiedSignatures | None = None):
        self.area = area
        self.verified = verified  # signatures a validator checked on the reading stream
        self.registry = registry
        self.paillier = paillier
        self.chained = isinstance(registry, RegistryHistory)
        self.registry_digest = None if self.chained else registry_digest(registry)
        self._kid = paillier.kid  # derived values, computed once: they are per-reading checks
        self._n = gmpy2.mpz(paillier.n)
        self._nsq = gmpy2.mpz(paillier.nsquare)
        # Per account, the leaf this app last wrote and its state: a block's account is
        # nearly always the leaf the block before left, and decoding one (its RLP, then
        # the canonical check) costs 3.6 µs where a copy of the state costs 0.13. A memo
        # of the pure function decode(leaf), used only for exactly those bytes.
        self._leaves: dict[str, tuple[bytes, AccountState]] = {}

    def execute(self, nodes: MutableMapping[bytes, bytes], parent_root: str, time_ms: int,
                txs: Sequence[bytes], *, trusted: bool = False,
                decoded: Sequence[object] | None = None) -> Outcome:
        """Apply `txs`. With `trusted`, `decoded[i]` may be the `Reading` the proposer
        encoded as `txs[i]`: used when it is well formed and encodes to exactly
        those bytes, which is what parsing them would give."""
        if decoded is not None and (not trusted or len(decoded) != len(txs)):
            raise ValueError("decoded readings come with trusted=True, one entry per tx")
        trie = Trie(nodes, bytes.fromhex(parent_root))
        accounts: dict[str, AccountState] = {}
        # Per account, the product of its ciphertexts in this block: one modmul per
        # reading, then one per account for its total and one for the block's.
        products: dict[str, gmpy2.mpz] = {}
        units = _Units(self._n)
        readings = alerts = 0
        nsq = self._nsq
        ref = start = self.registry_ref(trie)
        reg = self.registry.view(self.area, ref[0]) if self.chained else self.registry
        for i, tx in enumerate(txs):
            try:
                if tx.startswith(b'{"alert"'):
                    self._alert(i, tx, reg)
                    alerts += 1
                    continue
                if tx.startswith(b'{"registry"'):
                    ref = self._advance(i, tx, ref)
                    reg = self.registry.view(self.area, ref[0])
                    continue
                r = decoded[i] if decoded is not None else None
                if not (isinstance(r, Reading) and well_formed(r) and r.to_json() == tx):
                    r = self._parse(i, tx)
                c = self._ciphertext(i, r, reg)
                units.add(i, c)
                if not trusted and not self._signature_ok(reg, r):
                    raise InvalidBlock("tx_bad_signature", f"{r.meter} seq {r.seq}", index=i)
                account = reg.get(r.meter).account
                st = accounts.get(account)
                if st is None:
                    leaf = trie.get(account_key(account))
                    st = accounts[account] = (self._decoded(account, leaf) if leaf else
                                              AccountState(r.meter, 0, ZERO_HASH, 0, 0, 1))
                self._chain(i, r, st, time_ms)
            except Exception:
                units.raise_first(upto=i)  # a range fault at or before i came first
                raise
            p = products.get(account)
            products[account] = c if p is None else p * c % nsq
            readings += 1
        block_total = gmpy2.mpz(1)
        for account in sorted(accounts):
            st, p = accounts[account], products[account]
            st.total = int(st.total * p % nsq)
            block_total = block_total * p % nsq
        units.check(block_total)
        leaves = self._leaves
        for account in sorted(accounts):
            st = accounts[account]
            leaf = st.encode()
            trie.set(account_key(account), leaf)
            leaves[account] = (leaf, st)  # not changed after this: `_decoded` hands out copies
        if ref != start:
            trie.set(REGISTRY_KEY, rlp_encode([_uint(ref[0]), bytes.fromhex(ref[1])]))
        fields = {"registry": ref[1], "registry_height": ref[0]} if self.chained else {
            "registry": self.registry_digest}
        return Outcome(trie.commit().hex(), {
            "area": self.area, "kid": self._kid, **fields,
            "readings": readings, "alerts": alerts, "total": format(int(block_total), "x")})

    def _decoded(self, account: str, leaf: bytes) -> AccountState:
        """`AccountState.decode(leaf)`, as a fresh object the block may change."""
        known = self._leaves.get(account)
        if known is not None and known[0] == leaf:
            st = known[1]
            return AccountState(st.meter, st.seq, st.hash, st.count, st.last_t, st.total)
        return AccountState.decode(leaf)

    def _signature_ok(self, reg: Registry | RegistryView, r: Reading) -> bool:
        def verify() -> bool:
            return reg.verify(r.meter, r.signed_bytes, bytes.fromhex(r.sig))
        if self.verified is None:
            return verify()
        # The key binds the public key this block's registry view names (r.meter is in it).
        return self.verified.check(signature_key(reg.get(r.meter).public_key, r.hash, r.sig), verify)

    def registry_ref(self, trie: Trie) -> tuple[int, str]:
        """The registry height and header hash the state at `trie` judges membership by."""
        if not self.chained:
            return NO_REGISTRY
        raw = trie.get(REGISTRY_KEY)
        if not raw:
            return NO_REGISTRY
        height, h = rlp_decode(raw)
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

    @staticmethod
    def _parse(i: int, tx: bytes) -> Reading:
        try:
            r = parse_reading(tx)
        except Rejected as exc:
            raise InvalidBlock("tx_" + exc.reason, exc.detail, index=i) from None
        if r.to_json() != tx:
            raise InvalidBlock("tx_not_canonical", "a reading tx is its canonical JSON", index=i)
        return r

    def _ciphertext(self, i: int, r: Reading, reg: Registry | RegistryView) -> gmpy2.mpz:
        """Registry, key id and the bounds half of the range check (the gcd half is
        `_Units`'); these depend on this node's configuration, not only the bytes."""
        if r.meter not in reg:
            raise InvalidBlock("tx_unknown_meter", r.meter, index=i)
        if r.kid != self._kid:
            raise InvalidBlock("tx_unknown_key_id", r.kid, index=i)
        c = r.ciphertext_mpz
        if not 0 < c < self._nsq:
            raise InvalidBlock("tx_ciphertext_range", "c is not a unit below n^2", index=i)
        return c

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

    def _alert(self, i: int, tx: bytes, reg: Registry | RegistryView) -> None:
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


class _Units:
    """The gcd half of the ciphertext range check, gcd(c, n) = 1: one gcd per block.

    A prime factor of n divides a product mod n^2 exactly when it divides one of
    the factors, so the block total is a unit exactly when every ciphertext is.
    Only when it is not, or when the block fails for another reason, are the
    ciphertexts checked one by one, so the fault reported is the one checking each
    reading's range in turn, before its signature and chain, would have found first.
    """

    def __init__(self, n: gmpy2.mpz):
        self.n = n
        self.seen: list[tuple[int, gmpy2.mpz]] = []  # (tx index, c) past the bounds check

    def add(self, index: int, c: gmpy2.mpz) -> None:
        self.seen.append((index, c))

    def raise_first(self, *, upto: int) -> None:
        """Raise the range fault of the first tx up to index `upto`, if any."""
        for index, c in self.seen:
            if index > upto:
                break
            if gmpy2.gcd(c, self.n) != 1:
                raise InvalidBlock("tx_ciphertext_range", "c is not a unit below n^2", index=index) from None

    def check(self, product: gmpy2.mpz) -> None:
        """Raise the first range fault unless the block's product is a unit (when
        it is not, some factor is not: a prime dividing n^2 divides one of them)."""
        if gmpy2.gcd(product, self.n) != 1:
            self.raise_first(upto=self.seen[-1][0])
