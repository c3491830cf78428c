"""The registry chain's app: who the meters and the nodes are, certified.

Every transaction is a signed record in canonical JSON, one of

    enroll  {kind, meter, account, area, public_key, board, firmware, signer, time, sig, meter_sig[, replaces]}
    node    {kind, id, role, public_key, signer, time, sig}
    retire  {kind, target: "meter" | "node", id, reason, signer, time, sig}
    paillier {kind, kid, key, signer, time, sig}       the trustees' threshold public key
    settlement {kind, chain, period, tariff, bills, root, signer, time, sig}

`sig` is the signer's Ed25519 signature and `meter_sig` the enrolled meter's own
(its proof of possession: nobody can enroll a key they do not hold) over
`DOMAIN_* + canonical(record without sig and meter_sig)`. Signers are nodes:
registrars come from the chain's genesis file; a registrar enrolls the other
nodes (technicians, gateways, validators, trustees, coordinators); a
technician or a registrar enrolls and retires meters; only a registrar retires
nodes. A registrar publishes the trustees' threshold Paillier key (`key` is
`coordinator.threshold.ThresholdPublicKey.to_dict()`; its kid must match), so a
bill can prove which verification keys its partial decryptions answer to. A
coordinator (or a registrar) records each settlement run: the Merkle root of its
bill ids, once per chain and period. Meter ids, node ids and public keys are never reused.

An account has at most one active meter. Enrolling a meter for an account
whose meter is still active is refused unless the record names that meter in
`replaces`: the swap is then one transaction that retires the old meter and
enrolls the new one (a typo in an account id cannot silently take over
someone's account). Either way the new meter's leaf records the meter it
`replaces`, and the area chain lets the account's history continue on it.

State is an MPT (`certlog.mpt`, Ethereum's trie) keyed by SHA-256 of `kind NUL id`:

    meter/ID    RLP [account, area, public key, board, firmware, signer, time, retired, replaces]
    node/ID     RLP [role, public key, retired]
    key/PUB     the owner, "meter/ID" or "node/ID"
    account/A   RLP [meter ids, oldest first]
    paillier/KID        RLP [canonical JSON of the threshold public key]
    settlement/CHAIN/PERIOD  RLP [root, bills, tariff, signer, time]

`RegistryHistory` is the read side: every certified enrollment with the height
it took effect (and the height it was retired), so the area chain can ask
"who was enrolled in this area at registry height R" exactly, whatever height
the local replica has reached since.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import tomllib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, MutableMapping, Sequence

import rlp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.registry import MeterEntry
from certlog.app import InvalidBlock, Outcome
from certlog.block import Header, canonical
from certlog.mpt import BLANK_ROOT, Trie
from certlog.store import ChainStore
from gridledger.errors import ConfigError
from gridledger.meterkeys import verifier
from gridledger.wire import METER_ID_RE

__all__ = ["RegistryApp", "RegistryHistory", "RegistryView", "Genesis", "load_genesis", "dump_genesis",
           "ROLES", "sign_record", "enroll_record", "node_record", "retire_record", "record_id",
           "paillier_key_id", "settlement_key_id", "enrollment_message", "meter_signature_ok", "REASONS"]

DOMAIN_SIGNER = b"gridledger registry v1 signer\n"
DOMAIN_METER = b"gridledger registry v1 meter\n"
ROLES = ("registrar", "technician", "gateway", "validator", "trustee", "coordinator")
METER_SIGNERS = ("registrar", "technician")
MAX_FUTURE_S = 300
MAX_TEXT = 64
_FIELDS = {
    "enroll": {"kind", "meter", "account", "area", "public_key", "board", "firmware", "signer", "time", "sig",
               "meter_sig"},
    "node": {"kind", "id", "role", "public_key", "signer", "time", "sig"},
    "retire": {"kind", "target", "id", "reason", "signer", "time", "sig"},
    "paillier": {"kind", "kid", "key", "signer", "time", "sig"},
    "settlement": {"kind", "chain", "period", "tariff", "bills", "root", "signer", "time", "sig"},
}
_OPTIONAL = {"enroll": {"replaces"}}
_SIGNERS = {"paillier": ("registrar",), "settlement": ("registrar", "coordinator")}
HEX64 = re.compile(r"[0-9a-f]{64}")
GENESIS_ROOT = BLANK_ROOT.hex()


def _key(kind: str, ident: str) -> bytes:
    return hashlib.sha256(kind.encode() + b"\0" + ident.encode()).digest()


def record_id(tx: bytes) -> str:
    """How a submitted record is named in results: SHA-256 of its bytes, hex."""
    return hashlib.sha256(tx).hexdigest()


def _body(rec: dict) -> bytes:
    return canonical({k: v for k, v in rec.items() if k not in ("sig", "meter_sig")})


# What each refusal means for the person who gets it (the CLI prints it).
REASONS = {
    "tx_malformed": "the record is not JSON",
    "tx_unknown_kind": "not a kind of record the registry knows",
    "tx_bad_field": "a field is missing, extra or malformed",
    "tx_not_canonical": "the record is not in canonical JSON",
    "tx_unknown_signer": "the signer is not a registered node: a registrar must first register it "
                         "(`gridledger registry node --role technician`)",
    "tx_signer_role": "the signer's role may not sign this record (meters: a technician or a registrar)",
    "tx_signer_retired": "the signer has been retired",
    "tx_bad_signature": "the signer's signature does not verify: wrong --key for --signer, or the record changed",
    "tx_bad_meter_signature": "the meter's proof of possession does not verify: it must sign exactly the "
                              "bytes `gridledger registry enroll-request` prints, with the key it reported",
    "tx_duplicate_meter": "this meter id is already enrolled (ids are never reused): pick a new id",
    "tx_duplicate_key": "this public key (or threshold key) is already registered",
    "tx_duplicate_node": "this node id is already registered",
    "tx_account_has_meter": "the account already has an active meter: to swap it, name it with --replaces",
    "tx_bad_replacement": "--replaces must name the account's current meter, in the same area",
    "tx_unknown_target": "no such meter or node",
    "tx_already_retired": "already retired",
    "tx_future_time": "the record's time is more than 5 minutes ahead of the registry's clock",
    "tx_duplicate_settlement": "this period is already settled on this chain",
    "tx_too_large": "the record is too large",
}


# -- genesis ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Genesis:
    """The registrars every replica starts from (`registry-genesis.toml`)."""
    registrars: dict[str, str]  # id -> Ed25519 public key hex

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical(sorted(self.registrars.items()))).hexdigest()


def load_genesis(path: Path) -> Genesis:
    try:
        doc = tomllib.loads(Path(path).read_text())
        regs = {r["id"]: r["public_key"] for r in doc["registrars"]}
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: a registry genesis needs [[registrars]] with id and public_key ({exc})") from exc
    for ident, pub in regs.items():
        if not METER_ID_RE.match(ident):
            raise ConfigError(f"{path}: bad registrar id {ident!r}")
        verifier(pub)  # raises ConfigError on a malformed key
    if not regs:
        raise ConfigError(f"{path}: at least one registrar is needed")
    return Genesis(regs)


def dump_genesis(g: Genesis) -> str:
    out = ["# gridledger registry chain genesis: the registrars every replica trusts at height 0", ""]
    for ident, pub in sorted(g.registrars.items()):
        out += ["[[registrars]]", f'id = "{ident}"', f'public_key = "{pub}"', ""]
    return "\n".join(out)


# -- building records (CLI, testbed, tests) ------------------------------------------

def sign_record(rec: dict, signer_key: Ed25519PrivateKey, meter_key: Ed25519PrivateKey | None = None, *,
                meter_sig: str | None = None) -> bytes:
    """The transaction bytes of `rec` signed by its signer and, for an enrollment,
    by the meter: with its key (testbed) or a signature it made itself (`meter_sig`,
    hex, over `enrollment_message(rec)`: the key never leaves the device)."""
    body = _body(rec)
    out = dict(rec, sig=signer_key.sign(DOMAIN_SIGNER + body).hex())
    if meter_key is not None:
        out["meter_sig"] = meter_key.sign(DOMAIN_METER + body).hex()
    elif meter_sig is not None:
        out["meter_sig"] = meter_sig
    return canonical(out)


def enroll_record(*, meter: str, account: str, area: str, public_key: str, signer: str, time: int,
                  board: str = "unix", firmware: str = "", replaces: str | None = None) -> dict:
    rec = {"kind": "enroll", "meter": meter, "account": account, "area": area, "public_key": public_key,
           "board": board, "firmware": firmware, "signer": signer, "time": time}
    return rec if replaces is None else dict(rec, replaces=replaces)


def enrollment_message(rec: dict) -> bytes:
    """The exact bytes a meter signs to prove it holds the key it enrolls (its proof
    of possession): a domain tag and the canonical record without signatures."""
    return DOMAIN_METER + _body(rec)


def meter_signature_ok(rec: dict, meter_sig: str) -> bool:
    """Does `meter_sig` (hex) prove possession of `rec`'s public key? False on anything malformed."""
    pub = _ed25519(rec.get("public_key", "")) if isinstance(rec.get("public_key"), str) else None
    return pub is not None and isinstance(meter_sig, str) and _verifies(pub, meter_sig, enrollment_message(rec))


def node_record(*, ident: str, role: str, public_key: str, signer: str, time: int) -> dict:
    return {"kind": "node", "id": ident, "role": role, "public_key": public_key, "signer": signer, "time": time}


def retire_record(*, target: str, ident: str, reason: str, signer: str, time: int) -> dict:
    return {"kind": "retire", "target": target, "id": ident, "reason": reason, "signer": signer, "time": time}


# -- the app ---------------------------------------------------------------------------

def _ed25519(hexkey: str) -> Callable[[bytes, bytes], bool] | None:
    """The key's verifier (meterkeys': one Ed25519 rule for every signature the
    system checks), or None when it is not 32 bytes of hex."""
    try:
        return verifier(hexkey)
    except ConfigError:
        return None


def _verifies(verify: Callable[[bytes, bytes], bool], sig_hex: str, msg: bytes) -> bool:
    try:
        return verify(msg, bytes.fromhex(sig_hex))
    except (TypeError, ValueError):
        return False


def _parse(i: int, tx: bytes) -> dict:
    def bad(reason: str, detail: str) -> InvalidBlock:
        return InvalidBlock(reason, detail, index=i)

    try:
        rec = json.loads(tx)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("tx_malformed", "not JSON") from None
    if not isinstance(rec, dict) or rec.get("kind") not in _FIELDS:
        raise bad("tx_unknown_kind", f"kind must be one of {', '.join(_FIELDS)}")
    kind = rec["kind"]
    if not _FIELDS[kind] <= set(rec) <= _FIELDS[kind] | _OPTIONAL.get(kind, set()):
        raise bad("tx_bad_field", f"{kind} needs exactly {sorted(_FIELDS[kind])}"
                                  + (f", optionally {sorted(_OPTIONAL[kind])}" if kind in _OPTIONAL else ""))
    if canonical(rec) != tx:
        raise bad("tx_not_canonical", "a record is its canonical JSON")
    for k, v in rec.items():
        if k == "time" or k == "bills":
            if type(v) is not int or not 0 <= v < 2**40 or (k == "time" and v == 0):
                raise bad("tx_bad_field", f"{k} must be a non-negative integer (time: seconds since 1970)")
        elif k == "key":
            if not isinstance(v, dict):
                raise bad("tx_bad_field", "key is the threshold public key object")
        elif not isinstance(v, str) or len(v) > (128 if k.endswith("sig") else 200 if k == "reason" else
                                                 96 if k == "public_key" else MAX_TEXT):
            raise bad("tx_bad_field", f"{k} must be a short string")
    for k in ("meter", "area", "signer", "id", "replaces"):
        if k in rec and not METER_ID_RE.match(rec[k]):
            raise bad("tx_bad_field", f"{k} must match [A-Za-z0-9_-]{{1,32}}")
    if kind == "enroll" and not rec["account"]:
        raise bad("tx_bad_field", "account must not be empty")
    if kind == "node" and rec["role"] not in ROLES:
        raise bad("tx_bad_field", f"role must be one of {', '.join(ROLES)}")
    if kind == "retire" and rec["target"] not in ("meter", "node"):
        raise bad("tx_bad_field", "target must be meter or node")
    if kind == "settlement" and not (METER_ID_RE.match(rec["chain"]) and METER_ID_RE.match(rec["period"])
                                     and HEX64.fullmatch(rec["tariff"]) and HEX64.fullmatch(rec["root"])):
        raise bad("tx_bad_field", "settlement: chain and period are ids, tariff and root 64 hex digits")
    return rec


class _State:
    """The block's working state: trie reads through a cache, writes at the end."""

    def __init__(self, trie: Trie):
        self.trie = trie
        self.dirty: dict[bytes, list] = {}

    def get(self, kind: str, ident: str) -> list | None:
        k = _key(kind, ident)
        if k in self.dirty:
            return self.dirty[k]
        raw = self.trie.get(k)
        return rlp.decode(raw) if raw else None

    def put(self, kind: str, ident: str, value: list) -> None:
        self.dirty[_key(kind, ident)] = value

    def commit(self) -> bytes:
        """Write the block's changes; the new root hash."""
        for k in sorted(self.dirty):
            self.trie.set(k, rlp.encode(self.dirty[k]))
        return self.trie.commit()


class RegistryApp:
    name = "registry"
    genesis_root = GENESIS_ROOT

    def __init__(self, genesis: Genesis):
        self.genesis = genesis
        self._registrars = {i: _ed25519(p) for i, p in genesis.registrars.items()}

    def execute(self, nodes: MutableMapping[bytes, bytes], parent_root: str, time_ms: int,
                txs: Sequence[bytes], *, trusted: bool = False, decoded: Sequence[object] | None = None) -> Outcome:
        # `decoded` is ignored: records are few and always parsed from their bytes.
        st = _State(Trie(nodes, bytes.fromhex(parent_root)))
        counts = {"enroll": 0, "node": 0, "retire": 0}  # header fields; the rarer kinds do not add any
        for i, tx in enumerate(txs):
            rec = _parse(i, tx)
            if rec["time"] * 1000 > time_ms + MAX_FUTURE_S * 1000:
                raise InvalidBlock("tx_future_time", f"record time {rec['time']}", index=i)
            self._authorise(i, st, rec, trusted)
            getattr(self, "_" + rec["kind"])(i, st, rec, trusted)
            if rec["kind"] in counts:
                counts[rec["kind"]] += 1
        return Outcome(st.commit().hex(), {"genesis": self.genesis.digest, **counts})

    def _authorise(self, i: int, st: _State, rec: dict, trusted: bool) -> None:
        who = rec["signer"]
        if who in self._registrars:
            role, pub = "registrar", self._registrars[who]
        else:
            node = st.get("node", who)
            if node is None:
                raise InvalidBlock("tx_unknown_signer", who, index=i)
            if node[2] == b"\x01":
                raise InvalidBlock("tx_signer_retired", who, index=i)
            role, pub = node[0].decode(), _ed25519(node[1].hex())
        allowed = (METER_SIGNERS if rec["kind"] == "enroll" or rec.get("target") == "meter" else
                   _SIGNERS.get(rec["kind"], ("registrar",)))
        if role not in allowed:
            raise InvalidBlock("tx_signer_role", f"a {role} cannot sign a {rec['kind']} record", index=i)
        if not trusted and (pub is None or not _verifies(pub, rec["sig"], DOMAIN_SIGNER + _body(rec))):
            raise InvalidBlock("tx_bad_signature", f"{rec['kind']} signed by {who}", index=i)

    def _fresh_key(self, i: int, st: _State, pub_hex: str, owner: str) -> None:
        if (pub_hex != pub_hex.lower() or pub_hex in self.genesis.registrars.values()
                or st.get("key", pub_hex) is not None):
            raise InvalidBlock("tx_duplicate_key", f"{pub_hex[:16]}… is already registered", index=i)
        st.put("key", pub_hex, [owner.encode()])

    def _enroll(self, i: int, st: _State, rec: dict, trusted: bool) -> None:
        meter = rec["meter"]
        pub = _ed25519(rec["public_key"])
        if pub is None or len(rec["public_key"]) != 64:
            raise InvalidBlock("tx_bad_field", "public_key is a 32-byte Ed25519 key in hex", index=i)
        if st.get("meter", meter) is not None:
            raise InvalidBlock("tx_duplicate_meter", f"{meter} is already enrolled", index=i)
        if not trusted and not _verifies(pub, rec["meter_sig"], DOMAIN_METER + _body(rec)):
            raise InvalidBlock("tx_bad_meter_signature", f"{meter} did not sign its enrollment", index=i)
        self._fresh_key(i, st, rec["public_key"], "meter/" + meter)
        history = st.get("account", rec["account"])
        meters = [m for m in history[0]] if history else []
        replaces = meters[-1] if meters else b""
        current = st.get("meter", replaces.decode()) if replaces else None
        if "replaces" in rec:
            if current is None or rec["replaces"] != replaces.decode() or current[1].decode() != rec["area"]:
                raise InvalidBlock("tx_bad_replacement", f"{rec['replaces']} is not the current meter of "
                                   f"{rec['account']} in {rec['area']}", index=i)
            if current[7] != b"\x01":  # the swap retires the old meter in the same transaction
                st.put("meter", rec["replaces"], current[:7] + [b"\x01"] + current[8:])
        elif current is not None and current[7] != b"\x01":
            raise InvalidBlock("tx_account_has_meter", f"{rec['account']} has active meter {replaces.decode()}; "
                               "name it in replaces to swap it", index=i)
        st.put("account", rec["account"], [meters + [meter.encode()]])
        st.put("meter", meter, [rec["account"].encode(), rec["area"].encode(), bytes.fromhex(rec["public_key"]),
                                rec["board"].encode(), rec["firmware"].encode(), rec["signer"].encode(),
                                rec["time"], b"", replaces])

    def _node(self, i: int, st: _State, rec: dict, trusted: bool) -> None:
        ident, pub = rec["id"], rec["public_key"]
        width = 96 if rec["role"] == "validator" else 64  # BLS G1 or Ed25519
        try:
            ok = len(pub) == width and len(bytes.fromhex(pub)) * 2 == width
        except ValueError:
            ok = False
        if not ok or (width == 64 and _ed25519(pub) is None):
            raise InvalidBlock("tx_bad_field", f"a {rec['role']} key is {width} hex digits", index=i)
        if ident in self._registrars or st.get("node", ident) is not None:
            raise InvalidBlock("tx_duplicate_node", f"{ident} is already a node", index=i)
        self._fresh_key(i, st, pub, "node/" + ident)
        st.put("node", ident, [rec["role"].encode(), bytes.fromhex(pub), b""])

    def _retire(self, i: int, st: _State, rec: dict, trusted: bool) -> None:
        target, ident = rec["target"], rec["id"]
        leaf = st.get(target, ident)
        if leaf is None:
            raise InvalidBlock("tx_unknown_target", f"no {target} {ident}", index=i)
        flag = 7 if target == "meter" else 2
        if leaf[flag] == b"\x01":
            raise InvalidBlock("tx_already_retired", f"{target} {ident}", index=i)
        st.put(target, ident, leaf[:flag] + [b"\x01"] + leaf[flag + 1:])


    def _paillier(self, i: int, st: _State, rec: dict, trusted: bool) -> None:
        from .threshold import ThresholdError, ThresholdPublicKey
        try:
            key = ThresholdPublicKey.from_dict(rec["key"])
        except ThresholdError as exc:
            raise InvalidBlock("tx_bad_field", f"key: {exc}", index=i) from None
        if key.kid != rec["kid"] or canonical(key.to_dict()) != canonical(rec["key"]):
            raise InvalidBlock("tx_bad_field", "key is not in canonical form or its kid differs", index=i)
        if st.get("paillier", key.kid) is not None:
            raise InvalidBlock("tx_duplicate_key", f"threshold key {key.kid} is already published", index=i)
        st.put("paillier", key.kid, [canonical(rec["key"])])

    def _settlement(self, i: int, st: _State, rec: dict, trusted: bool) -> None:
        ident = f"{rec['chain']}/{rec['period']}"
        if st.get("settlement", ident) is not None:
            raise InvalidBlock("tx_duplicate_settlement", f"{ident} is already settled", index=i)
        st.put("settlement", ident, [bytes.fromhex(rec["root"]), rec["bills"], bytes.fromhex(rec["tariff"]),
                                     rec["signer"].encode(), rec["time"]])


def paillier_key_id(kid: str) -> bytes:
    """The registry state key under which threshold key `kid` is published."""
    return _key("paillier", kid)


def settlement_key_id(chain: str, period: str) -> bytes:
    return _key("settlement", f"{chain}/{period}")


# -- the read side: who was enrolled where, at which height ------------------------

@dataclass(frozen=True, slots=True)
class _Enrolled:
    entry: MeterEntry
    area: str
    since: int          # first registry height it is a member at
    until: int | None   # first height it is not (retired), or None


class RegistryHistory:
    """Certified enrollments with their heights, fed by the registry replica's commits.

    Thread-safe for one writer (the replica's commit) and many readers: entries
    are only ever added, and a view at height R ignores everything after R."""

    def __init__(self, chain: str = "registry"):
        self.chain = chain
        self.height = 0
        self._hashes: dict[int, str] = {}
        self._meters: dict[str, _Enrolled] = {}
        self._nodes: dict[str, tuple[str, int | None]] = {}  # id -> (role, retired at height)
        self._verifiers: dict[str, Callable[[bytes, bytes], bool]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_store(cls, store: ChainStore, chain: str = "registry") -> "RegistryHistory":
        """Replay every certified block of a registry replica (they were checked when stored)."""
        h = cls(chain)
        for height in store.heights():
            raw = store.raw_block(height)
            if raw is None or raw[1] is None:
                break
            h.apply(Header.decode(raw[0]), raw[2])
        return h

    def apply(self, header: Header, txs: Sequence[bytes]) -> None:
        """Record a certified block (a `Replica` commit listener)."""
        with self._lock:
            if header.height != self.height + 1:
                return
            for tx in txs:
                rec = json.loads(tx)
                if rec["kind"] == "enroll":
                    e = MeterEntry(rec["meter"], rec["account"], rec["public_key"])
                    self._meters[e.meter] = _Enrolled(e, rec["area"], header.height, None)
                    if "replaces" in rec:
                        self._retire_meter(rec["replaces"], header.height)
                elif rec["kind"] == "retire" and rec["target"] == "meter":
                    self._retire_meter(rec["id"], header.height)
                elif rec["kind"] == "node":
                    self._nodes[rec["id"]] = (rec["role"], None)
                elif rec["kind"] == "retire":
                    self._nodes[rec["id"]] = (self._nodes[rec["id"]][0], header.height)
            self._hashes[header.height] = header.hash
            self.height = header.height

    def _retire_meter(self, meter: str, height: int) -> None:
        old = self._meters[meter]
        if old.until is None:  # a swap names a meter that may have been retired before
            self._meters[meter] = _Enrolled(old.entry, old.area, old.since, height)

    def hash_at(self, height: int) -> str | None:
        return self._hashes.get(height)

    def active_meters(self) -> dict[str, str]:
        """meter -> area of every meter enrolled and not retired at the latest height."""
        return {m: e.area for m, e in list(self._meters.items()) if e.until is None}

    def retired_nodes(self) -> set[str]:
        return {n for n, (_, until) in list(self._nodes.items()) if until is not None}

    def account_of(self, meter: str) -> str | None:
        """The account a meter was ever enrolled for: meter ids are never reused,
        so this holds at every height, retired or not."""
        e = self._meters.get(meter)
        return e.entry.account if e else None

    def accounts(self, area: str) -> list[str]:
        """Every account that ever had a meter in `area` (retired ones too: they may
        still owe for readings before their retirement), sorted."""
        return sorted({e.entry.account for e in list(self._meters.values()) if e.area == area})

    def view(self, area: str, height: int | None = None) -> "RegistryView":
        """Members of `area` at registry `height` (None: whatever is latest when asked)."""
        return RegistryView(self, area, height)

    def _member(self, meter: str, area: str, height: int) -> MeterEntry | None:
        e = self._meters.get(meter)
        if e is None or e.area != area or e.since > height or (e.until is not None and e.until <= height):
            return None
        return e.entry

    def _verify(self, entry: MeterEntry, msg: bytes, sig: bytes) -> bool:
        v = self._verifiers.get(entry.meter)
        if v is None:
            v = self._verifiers[entry.meter] = verifier(entry.public_key)
        return v(msg, sig)


class RegistryView:
    """The `aggregator.registry.Registry` interface over a `RegistryHistory`."""

    def __init__(self, history: RegistryHistory, area: str, height: int | None):
        self.history = history
        self.area = area
        self._height = height

    @property
    def height(self) -> int:
        return self.history.height if self._height is None else self._height

    def get(self, meter: str) -> MeterEntry | None:
        return self.history._member(meter, self.area, self.height)

    def __contains__(self, meter: str) -> bool:
        return self.get(meter) is not None

    def __iter__(self) -> Iterator[MeterEntry]:
        h = self.height
        return iter([e.entry for e in list(self.history._meters.values())
                     if self.history._member(e.entry.meter, self.area, h) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def verify(self, meter: str, msg: bytes, sig: bytes) -> bool:
        e = self.get(meter)
        return e is not None and self.history._verify(e, msg, sig)

    def verifier(self, meter: str) -> Callable[[bytes, bytes], bool] | None:
        """`verify` for one meter as a function of (msg, sig); None when it is not a member."""
        e = self.get(meter)
        return None if e is None else partial(self.history._verify, e)
