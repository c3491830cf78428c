"""The P chain's app: where each certified area block is placed, and who holds it.

Transactions (canonical JSON), proposed by the verifier:

    placement {kind, height, hash, cert: {signers, sig}, nodes, snapshot}
    receipt   {kind, receipt: {chain, height, hash, node, kind, sig}}
    receipts  {kind, batch: {chain, node, kind, blocks: [[height, hash], ...], sig}, heights}
    replace   {kind, height, hash, old, new, evidence, snapshot}
    promote   {kind, dead, new, evidence: {via, r_height, seen}, snapshot}
    readmit   {kind, node, evidence: {seen, height}}

A placement names an area block by height and header hash, with the area chain's
certificate for it (checked against the area validator set, so only certified
blocks are placed), the RV snapshot of every heavy and light node, and the
chosen nodes, which must be exactly `reliability.place` over that snapshot. A
snapshot's T for a node must equal the blocks already placed on it here. A
receipt is a storage node's BLS receipt (`aggregator.receipts`): it must verify
under the node's key from the genesis, name a placed block by its hash and a
node chosen for it, once. A receipts record carries a node's receipt batch (one
signature over several (height, hash)) and the `heights` of it to count here:
the signature is checked once, then each of those heights exactly as a single
receipt (so the verifier can record the part of a batch whose blocks are placed
now and the rest in a later record). A replace moves a placed block's replica from `old`
(a chosen node, e.g. one that failed an audit) to `new`, which must be the best
node by the snapshot's RV among those not chosen yet; `evidence` is the R-chain
height the verifier names as its reason (recorded, not checked here: this app
does not read the R chain). `old`'s receipt stops counting and `stored` is
recomputed over the new set.

A promote turns the best heavy node by the snapshot's RV into a full node in
place of a dead full node (`dead` must be full now, `new` heavy now); every
block placed on `dead` moves to `new` (or, where `new` already held a replica,
to the best free candidate), `dead`'s receipts stop counting. `evidence` is the
verifier's: the last will it saw (`via` last_will) or the R-chain height of the
missing audits (`via` missing); recorded, not checked against the R chain. A
readmit brings a dead node back as a candidate (a dead full node returns heavy).

State (MPT keyed by SHA-256 of `kind NUL id`):

    block/H   RLP [header hash, chosen nodes, receipted nodes, stored]
    node/N    RLP [blocks placed on N now]
    roles/    RLP [full nodes now, dead nodes]   (absent: the genesis's full nodes, none dead)
    top/      RLP [highest placed area height]

`stored` turns 1 once more than 2/3 of the chosen nodes have receipted (seed 003's
N+X second verification). The genesis file fixes the area, `replicas` and the
storage nodes with their kinds and BLS keys; its digest is a header field.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import MutableMapping, Sequence

import rlp

from certlog import bls
from certlog.app import InvalidBlock, Outcome
from certlog.block import Certificate, ChainError, canonical
from certlog.mpt import BLANK_ROOT, Trie
from certlog.validators import ValidatorSet
from gridledger.errors import ConfigError

from .receipts import ReceiptBatch, StorageReceipt, verify_receipt, verify_receipts
from .reliability import SCALE, Measure, place, rank
from .storagewire import KINDS, NODE_RE

__all__ = ["PNode", "PGenesis", "load_pgenesis", "dump_pgenesis", "PChainApp", "placement_tx", "receipt_tx",
           "receipts_tx",
           "block_key", "node_key", "decode_block_leaf", "stored_now", "replace_tx", "replacement", "TrieView",
           "parse_record", "state_key", "Roles", "roles_key", "decode_roles_leaf", "promote_tx", "readmit_tx",
           "promotion", "promote_block", "EVIDENCE_VIA"]

HEX64 = 64


@dataclass(frozen=True, slots=True)
class PNode:
    name: str
    kind: str          # full | heavy | light
    public_key: bytes  # BLS, signs its receipts


@dataclass(frozen=True, slots=True)
class PGenesis:
    area: str
    replicas: int
    nodes: tuple[PNode, ...]
    cre_start: int = SCALE   # every node's CRE before its first audit (the R chain starts from it)

    def __post_init__(self):
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names) or not all(NODE_RE.match(n) for n in names):
            raise ConfigError("P-chain genesis: node names must be unique and match [A-Za-z0-9_-]{1,64}")
        if any(n.kind not in KINDS or len(n.public_key) != bls.PUBKEY_LEN for n in self.nodes):
            raise ConfigError(f"P-chain genesis: kinds are {', '.join(KINDS)}; keys are 48-byte BLS keys")
        if type(self.replicas) is not int or self.replicas < 0:
            raise ConfigError("P-chain genesis: replicas must be an integer >= 0")
        if type(self.cre_start) is not int or not 0 <= self.cre_start <= SCALE:
            raise ConfigError(f"P-chain genesis: cre_start must be an integer in [0, {SCALE}]")

    @property
    def full(self) -> tuple[str, ...]:
        return tuple(sorted(n.name for n in self.nodes if n.kind == "full"))

    @property
    def candidates(self) -> tuple[str, ...]:
        """Heavy and light nodes, sorted: the ones ranked by RV."""
        return tuple(sorted(n.name for n in self.nodes if n.kind != "full"))

    def node(self, name: str) -> PNode | None:
        return next((n for n in self.nodes if n.name == name), None)

    @property
    def digest(self) -> str:
        nodes = sorted([n.name, n.kind, n.public_key.hex()] for n in self.nodes)
        return hashlib.sha256(canonical({"area": self.area, "replicas": self.replicas, "nodes": nodes,
                                         "cre_start": self.cre_start})).hexdigest()


def load_pgenesis(path: Path) -> PGenesis:
    try:
        doc = tomllib.loads(Path(path).read_text())
        nodes = tuple(PNode(n["name"], n["kind"], bytes.fromhex(n["public_key"])) for n in doc.get("nodes", []))
        return PGenesis(doc["area"], doc.get("replicas", 2), nodes, doc.get("cre_start", SCALE))
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: a P-chain genesis needs area, replicas and [[nodes]] "
                          f"with name, kind, public_key ({exc})") from exc


def dump_pgenesis(g: PGenesis) -> str:
    out = ["# gridledger P-chain genesis: the area, the replicas beyond the full nodes, the storage nodes", "",
           f'area = "{g.area}"', f"replicas = {g.replicas}", f"cre_start = {g.cre_start}", ""]
    for n in g.nodes:
        out += ["[[nodes]]", f'name = "{n.name}"', f'kind = "{n.kind}"', f'public_key = "{n.public_key.hex()}"', ""]
    return "\n".join(out)


# -- transactions ----------------------------------------------------------------------

def placement_tx(cert: Certificate, nodes: Sequence[str], snapshot: Sequence[Measure]) -> bytes:
    return canonical({"kind": "placement", "height": cert.height, "hash": cert.hash,
                      "cert": {"signers": list(cert.signers), "sig": cert.signature.hex()},
                      "nodes": list(nodes), "snapshot": [m.to_dict() for m in snapshot]})


def receipt_tx(receipt: StorageReceipt) -> bytes:
    return canonical({"kind": "receipt", "receipt": receipt.to_dict()})


def receipts_tx(batch: ReceiptBatch, heights: Sequence[int]) -> bytes:
    """The part `heights` of a signed receipt batch, to count as receipts."""
    return canonical({"kind": "receipts", "batch": batch.to_dict(), "heights": sorted(heights)})


def replace_tx(height: int, header_hash: str, old: str, new: str, evidence: int,
               snapshot: Sequence[Measure]) -> bytes:
    return canonical({"kind": "replace", "height": height, "hash": header_hash, "old": old, "new": new,
                      "evidence": evidence, "snapshot": [m.to_dict() for m in snapshot]})


def replacement(header_hash: str, chosen: Sequence[str], snapshot: Sequence[Measure]) -> str | None:
    """The node that takes over a replica of this block: the best by RV not holding it."""
    return next((n for n in rank(header_hash, snapshot) if n not in chosen), None)


EVIDENCE_VIA = ("last_will", "missing")


@dataclass(frozen=True, slots=True)
class Roles:
    """Who is full now and who is dead: the genesis's kinds as promotions changed them."""
    full: tuple[str, ...]
    dead: tuple[str, ...] = ()

    def kind_of(self, genesis: PGenesis, name: str) -> str:
        """A node's kind now: full if in `full`; a genesis full node that is not is heavy."""
        if name in self.full:
            return "full"
        kind = genesis.node(name).kind
        return "heavy" if kind == "full" else kind

    def candidates(self, genesis: PGenesis) -> tuple[str, ...]:
        """Heavy and light nodes now (not full, not dead), sorted: the ones ranked by RV."""
        return tuple(sorted(n.name for n in genesis.nodes if n.name not in self.full and n.name not in self.dead))

    def promoted(self, dead: str, new: str) -> "Roles":
        return Roles(tuple(sorted([n for n in self.full if n != dead] + [new])), tuple(sorted({*self.dead, dead})))

    def readmitted(self, node: str) -> "Roles":
        return Roles(self.full, tuple(n for n in self.dead if n != node))

    def to_leaf(self) -> list:
        return [[n.encode() for n in self.full], [n.encode() for n in self.dead]]

    @classmethod
    def of(cls, genesis: PGenesis, leaf: list | None) -> "Roles":
        if leaf is None:
            return cls(genesis.full)
        return cls(tuple(n.decode() for n in leaf[0]), tuple(n.decode() for n in leaf[1]))


def decode_roles_leaf(raw: bytes, genesis: PGenesis) -> Roles:
    return Roles.of(genesis, rlp.decode(raw) if raw else None)


def promote_tx(dead: str, new: str, *, via: str, r_height: int, seen: int, snapshot: Sequence[Measure]) -> bytes:
    return canonical({"kind": "promote", "dead": dead, "new": new,
                      "evidence": {"via": via, "r_height": r_height, "seen": seen},
                      "snapshot": [m.to_dict() for m in snapshot]})


def readmit_tx(node: str, *, seen: int, height: int) -> bytes:
    return canonical({"kind": "readmit", "node": node, "evidence": {"seen": seen, "height": height}})


def promotion(dead: str, heavy: Sequence[Measure]) -> str | None:
    """The heavy node promoted in place of `dead`: the best by RV (ties by hash, as `rank`)."""
    ranked = rank(f"promote/{dead}", heavy)
    return ranked[0] if ranked else None


def promote_block(header_hash: str, chosen: Sequence[str], receipted: Sequence[str], dead: str, new: str,
                  snapshot: Sequence[Measure]) -> tuple[list[str], list[str], str | None]:
    """One placed block after `new` replaces the dead full node `dead`: (chosen, receipted,
    the node that now must fetch it). Where `new` held a replica already, that replica's
    slot goes to the best free candidate (`replacement`), so the block keeps its count."""
    if dead not in chosen:
        return list(chosen), list(receipted), None
    if new in chosen:
        taker = replacement(header_hash, chosen, [m for m in snapshot if m.node != new])
    else:
        taker = new
    out = [taker if n == dead else n for n in chosen if taker is not None or n != dead]
    return out, [n for n in receipted if n != dead], taker


def state_key(kind: str, ident: str) -> bytes:
    return hashlib.sha256(kind.encode() + b"\0" + ident.encode()).digest()


def block_key(height: int) -> bytes:
    return state_key("block", str(height))


def node_key(name: str) -> bytes:
    return state_key("node", name)


ROLES_KEY = state_key("roles", "")
TOP_KEY = state_key("top", "")


def roles_key() -> bytes:
    return ROLES_KEY


def decode_block_leaf(raw: bytes) -> dict:
    """A `block/H` leaf as {hash, nodes, receipted, stored}."""
    h, nodes, got, stored = rlp.decode(raw)
    return {"hash": h.hex(), "nodes": [n.decode() for n in nodes], "receipted": [n.decode() for n in got],
            "stored": stored == b"\x01"}


def stored_now(receipted: int, chosen: int) -> bool:
    """More than 2/3 of the chosen nodes have receipted."""
    return 3 * receipted > 2 * chosen


class _Ref:
    """What `ValidatorSet.check_certificate` needs of a header: its identity."""
    __slots__ = ("chain", "height", "hash")

    def __init__(self, chain: str, height: int, hash: str):
        self.chain, self.height, self.hash = chain, height, hash


def _int(v, lo: int = 0) -> bool:
    return type(v) is int and lo <= v < 2 ** 62


def _measures(raw) -> list[Measure]:
    """A snapshot's entries (ValueError, KeyError, TypeError when malformed)."""
    if any(set(m) != {"node", "cp", "np", "cre", "t"} for m in raw):
        raise ValueError("snapshot entry fields")
    return [Measure(m["node"], m["cp"], m["np"], m["cre"], m["t"]) for m in raw]


def _load(get, node: str) -> int:
    """T: blocks placed on `node` now (a replacement moves one to another node)."""
    leaf = get(node_key(node))
    return int.from_bytes(leaf[0], "big") if leaf else 0


class TrieView:
    """An app's reads and writes within one block: writes are seen by later reads of
    the same block and reach the trie once, in key order, on `commit`."""

    def __init__(self, nodes: MutableMapping[bytes, bytes], parent_root: str):
        self.trie = Trie(nodes, bytes.fromhex(parent_root))
        self.dirty: dict[bytes, list] = {}

    def get(self, key: bytes) -> list | None:
        if key in self.dirty:
            return self.dirty[key]
        raw = self.trie.get(key)
        return rlp.decode(raw) if raw else None

    def put(self, key: bytes, value: list) -> None:
        self.dirty[key] = rlp.decode(rlp.encode(value))  # as `get` reads it back

    def commit(self) -> str:
        for k in sorted(self.dirty):
            self.trie.set(k, rlp.encode(self.dirty[k]))
        return self.trie.commit().hex()


def parse_record(i: int, tx: bytes, want: dict[str, set[str]]) -> dict:
    """A record as canonical JSON with a known `kind` and exactly its fields."""
    try:
        rec = json.loads(tx)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidBlock("tx_malformed", "not JSON", index=i) from None
    if not isinstance(rec, dict) or rec.get("kind") not in want:
        raise InvalidBlock("tx_unknown_kind", f"kind must be one of {sorted(want)}", index=i)
    if set(rec) != want[rec["kind"]]:
        raise InvalidBlock("tx_bad_field", f"{rec['kind']} needs exactly {sorted(want[rec['kind']])}", index=i)
    if canonical(rec) != tx:
        raise InvalidBlock("tx_not_canonical", "a record is its canonical JSON", index=i)
    return rec


RECORDS = {"placement": {"kind", "height", "hash", "cert", "nodes", "snapshot"}, "receipt": {"kind", "receipt"},
           "receipts": {"kind", "batch", "heights"},
           "replace": {"kind", "height", "hash", "old", "new", "evidence", "snapshot"},
           "promote": {"kind", "dead", "new", "evidence", "snapshot"}, "readmit": {"kind", "node", "evidence"}}


class PChainApp:
    name = "pchain"
    genesis_root = BLANK_ROOT.hex()

    def __init__(self, genesis: PGenesis, area_validators: ValidatorSet):
        self.genesis = genesis
        self.area_validators = area_validators

    def execute(self, nodes: MutableMapping[bytes, bytes], parent_root: str, time_ms: int,
                txs: Sequence[bytes], *, trusted: bool = False, decoded: Sequence[object] | None = None) -> Outcome:
        view = TrieView(nodes, parent_root)
        counts = {"placements": 0, "receipts": 0, "replacements": 0, "stored": 0}
        for i, tx in enumerate(txs):
            rec = parse_record(i, tx, RECORDS)
            if rec["kind"] == "placement":
                self._placement(i, rec, view.get, view.put, trusted)
                counts["placements"] += 1
            elif rec["kind"] == "replace":
                self._replace(i, rec, view.get, view.put)
                counts["replacements"] += 1
            elif rec["kind"] == "promote":
                self._promote(i, rec, view.get, view.put)
                counts["promotions"] = counts.get("promotions", 0) + 1
            elif rec["kind"] == "readmit":
                self._readmit(i, rec, view.get, view.put)
                counts["readmissions"] = counts.get("readmissions", 0) + 1
            elif rec["kind"] == "receipts":
                stored, counted = self._receipts(i, rec, view.get, view.put, trusted)
                counts["stored"] += stored
                counts["receipts"] += counted
            else:
                counts["stored"] += self._receipt(i, rec, view.get, view.put, trusted)
                counts["receipts"] += 1
        return Outcome(view.commit(), {"genesis": self.genesis.digest, **counts})

    def _placement(self, i: int, rec: dict, get, put, trusted: bool) -> None:
        g = self.genesis
        h, hh, c = rec["height"], rec["hash"], rec["cert"]
        try:
            if not _int(h, 1) or not isinstance(hh, str) or len(hh) != HEX64 or not isinstance(c, dict):
                raise ValueError("height, hash or cert")
            if bytes.fromhex(hh).hex() != hh:
                raise ValueError("hash must be lowercase hex")
            cert = Certificate(g.area, h, hh, tuple(c["signers"]), bytes.fromhex(c["sig"]))
            if not all(_int(s) for s in cert.signers) or set(c) != {"signers", "sig"}:
                raise ValueError("signers")
            snapshot = _measures(rec["snapshot"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidBlock("tx_bad_field", f"placement: {exc}", index=i) from None
        if get(block_key(h)) is not None:
            raise InvalidBlock("tx_duplicate_placement", f"area block {h} is already placed", index=i)
        try:
            self.area_validators.check_certificate(cert, _Ref(g.area, h, hh), remember=True)
        except ChainError as exc:
            raise InvalidBlock("tx_bad_certificate", f"{exc.reason}: block {h}", index=i) from None
        self._check_snapshot(i, snapshot, get)
        chosen = place(hh, self.roles(get).full, snapshot, g.replicas)
        if list(chosen) != rec["nodes"]:
            raise InvalidBlock("tx_wrong_placement", f"the snapshot chooses {list(chosen)}", index=i)
        for n in chosen:
            put(node_key(n), [_load(get, n) + 1])
        put(block_key(h), [bytes.fromhex(hh), [n.encode() for n in chosen], [], b""])
        top = get(TOP_KEY)
        if top is None or int.from_bytes(top[0], "big") < h:
            put(TOP_KEY, [h])

    def roles(self, get) -> Roles:
        return Roles.of(self.genesis, get(ROLES_KEY))

    def _check_snapshot(self, i: int, snapshot: list[Measure], get) -> None:
        if tuple(m.node for m in snapshot) != self.roles(get).candidates(self.genesis):
            raise InvalidBlock("tx_bad_snapshot", "the snapshot lists every heavy and light node, by name",
                               index=i)
        for m in snapshot:
            placed = _load(get, m.node)
            if m.t != placed:
                raise InvalidBlock("tx_snapshot_load", f"{m.node}: t {m.t}, placed {placed}", index=i)

    def _replace(self, i: int, rec: dict, get, put) -> None:
        """Move one block's replica from `old` to `new`, the best candidate by the
        snapshot's RV that does not hold it yet; `old`'s receipt no longer counts."""
        h, hh, old, new, ev = rec["height"], rec["hash"], rec["old"], rec["new"], rec["evidence"]
        try:
            if not _int(h, 1) or not _int(ev, 1) or not isinstance(hh, str) or len(hh) != HEX64:
                raise ValueError("height, hash or evidence")
            if not isinstance(old, str) or not isinstance(new, str):
                raise ValueError("old and new are node names")
            snapshot = _measures(rec["snapshot"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidBlock("tx_bad_field", f"replace: {exc}", index=i) from None
        leaf = get(block_key(h))
        if leaf is None:
            raise InvalidBlock("tx_not_placed", f"area block {h} is not placed", index=i)
        bhash, chosen, got, _ = leaf
        if bhash.hex() != hh:
            raise InvalidBlock("tx_wrong_block", f"another block is placed at height {h}", index=i)
        if old.encode() not in chosen:
            raise InvalidBlock("tx_not_chosen", f"block {h} is not placed on {old}", index=i)
        self._check_snapshot(i, snapshot, get)
        best = replacement(hh, [n.decode() for n in chosen], snapshot)
        if best is None:
            raise InvalidBlock("tx_no_candidate", f"every candidate holds block {h} already", index=i)
        if new != best:
            raise InvalidBlock("tx_wrong_placement", f"the snapshot chooses {best}", index=i)
        chosen = [new.encode() if n == old.encode() else n for n in chosen]
        got = [n for n in got if n != old.encode()]
        put(node_key(old), [max(0, _load(get, old) - 1)])
        put(node_key(new), [_load(get, new) + 1])
        put(block_key(h), [bhash, chosen, got, b"\x01" if stored_now(len(got), len(chosen)) else b""])

    def _promote(self, i: int, rec: dict, get, put) -> None:
        """`new` (heavy now, the best heavy node by the snapshot's RV) becomes full in
        place of `dead` (full now); every block placed on `dead` moves (`promote_block`)."""
        g = self.genesis
        dead, new, ev = rec["dead"], rec["new"], rec["evidence"]
        try:
            if not isinstance(dead, str) or not isinstance(new, str) or g.node(dead) is None or g.node(new) is None:
                raise ValueError("dead and new are nodes of the genesis")
            if not isinstance(ev, dict) or set(ev) != {"via", "r_height", "seen"} or ev["via"] not in EVIDENCE_VIA:
                raise ValueError(f"evidence: via ({', '.join(EVIDENCE_VIA)}), r_height, seen")
            if not _int(ev["seen"]) or not _int(ev["r_height"], 1 if ev["via"] == "missing" else 0) or (
                    ev["via"] == "last_will" and ev["r_height"] != 0):
                raise ValueError("evidence: seen (ms), r_height (>= 1 for missing audits, 0 for a last will)")
            snapshot = _measures(rec["snapshot"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidBlock("tx_bad_field", f"promote: {exc}", index=i) from None
        roles = self.roles(get)
        if dead not in roles.full:
            raise InvalidBlock("tx_not_full", f"{dead} is not a full node now", index=i)
        if roles.kind_of(g, new) != "heavy" or new in roles.dead:
            raise InvalidBlock("tx_not_heavy", f"{new} is not a heavy node now", index=i)
        self._check_snapshot(i, snapshot, get)
        best = promotion(dead, [m for m in snapshot if roles.kind_of(g, m.node) == "heavy"])
        if new != best:
            raise InvalidBlock("tx_wrong_promotion", f"the snapshot promotes {best}", index=i)
        top = get(TOP_KEY)
        for h in range(1, int.from_bytes(top[0], "big") + 1 if top else 1):
            leaf = get(block_key(h))
            if leaf is None:
                continue
            bhash, chosen, got, _ = leaf
            names, receipted = [n.decode() for n in chosen], [n.decode() for n in got]
            if dead not in names:
                continue
            names, receipted, taker = promote_block(bhash.hex(), names, receipted, dead, new, snapshot)
            put(node_key(dead), [max(0, _load(get, dead) - 1)])
            if taker is not None:
                put(node_key(taker), [_load(get, taker) + 1])
            put(block_key(h), [bhash, [n.encode() for n in names], [n.encode() for n in receipted],
                               b"\x01" if stored_now(len(receipted), len(names)) else b""])
        put(ROLES_KEY, roles.promoted(dead, new).to_leaf())

    def _readmit(self, i: int, rec: dict, get, put) -> None:
        """A dead node back (caught up, on the verifier's word): a candidate again."""
        node, ev = rec["node"], rec["evidence"]
        if (not isinstance(node, str) or not isinstance(ev, dict) or set(ev) != {"seen", "height"}
                or not _int(ev["seen"]) or not _int(ev["height"])):
            raise InvalidBlock("tx_bad_field", "readmit: node, evidence {seen, height}", index=i)
        roles = self.roles(get)
        if node not in roles.dead:
            raise InvalidBlock("tx_not_dead", f"{node} is not recorded dead", index=i)
        put(ROLES_KEY, roles.readmitted(node).to_leaf())

    def _receipt(self, i: int, rec: dict, get, put, trusted: bool) -> int:
        """Apply a receipt; 1 if it makes its block stored."""
        try:
            r = StorageReceipt.from_dict(rec["receipt"])
        except ChainError as exc:
            raise InvalidBlock("tx_bad_field", f"receipt: {exc.detail}", index=i) from None
        node = self._signer(i, r.chain, r.node, r.kind, get)
        self._check_receipt(i, r.node, r.height, r.hash, get)
        if not trusted and not verify_receipt(r, node.public_key):
            raise InvalidBlock("tx_bad_signature", f"receipt not signed by {r.node}", index=i)
        return self._count_receipt(r.node, r.height, get, put)

    def _receipts(self, i: int, rec: dict, get, put, trusted: bool) -> tuple[int, int]:
        """Apply the `heights` of a receipt batch, each as a single receipt: (blocks made
        stored, receipts counted). One signature check for all of them."""
        try:
            b = ReceiptBatch.from_dict(rec["batch"])
        except ChainError as exc:
            raise InvalidBlock("tx_bad_field", f"receipts: {exc.detail}", index=i) from None
        heights, hashes = rec["heights"], b.receipts()
        if (not isinstance(heights, list) or not heights or not all(_int(h, 1) and h in hashes for h in heights)
                or heights != sorted(set(heights))):
            raise InvalidBlock("tx_bad_field", "receipts: heights must be increasing heights of the batch", index=i)
        node = self._signer(i, b.chain, b.node, b.kind, get)
        for h in heights:
            self._check_receipt(i, b.node, h, hashes[h], get)
        if not trusted and not verify_receipts(b, node.public_key):
            raise InvalidBlock("tx_bad_signature", f"receipt batch not signed by {b.node}", index=i)
        return sum(self._count_receipt(b.node, h, get, put) for h in heights), len(heights)

    def _signer(self, i: int, chain: str, name: str, kind: str, get) -> PNode:
        """The genesis's node that signed a receipt of this area as its current kind."""
        g = self.genesis
        if chain != g.area:
            raise InvalidBlock("tx_wrong_chain", f"receipt for {chain}", index=i)
        node = g.node(name)
        if node is None:
            raise InvalidBlock("tx_unknown_node", name, index=i)
        now = self.roles(get).kind_of(g, name)
        if kind != now:
            raise InvalidBlock("tx_wrong_kind", f"{name} is {now}, receipt says {kind}", index=i)
        return node

    def _check_receipt(self, i: int, name: str, height: int, header_hash: str, get) -> None:
        """`name` may receipt block `height` now: placed there with that hash, chosen, not yet receipted."""
        leaf = get(block_key(height))
        if leaf is None:
            raise InvalidBlock("tx_not_placed", f"area block {height} is not placed", index=i)
        bhash, chosen, got, _ = leaf
        if bhash.hex() != header_hash:
            raise InvalidBlock("tx_wrong_block", f"receipt names another block at height {height}", index=i)
        if name.encode() not in chosen:
            raise InvalidBlock("tx_not_placed", f"block {height} is not placed on {name}", index=i)
        if name.encode() in got:
            raise InvalidBlock("tx_duplicate_receipt", f"{name} already receipted block {height}", index=i)

    def _count_receipt(self, name: str, height: int, get, put) -> int:
        """Record `name`'s (checked) receipt of block `height`; 1 if that makes it stored."""
        bhash, chosen, got, stored = get(block_key(height))
        got = sorted(list(got) + [name.encode()])
        now = stored_now(len(got), len(chosen))
        put(block_key(height), [bhash, list(chosen), got, b"\x01" if now else b""])
        return int(now and stored != b"\x01")
