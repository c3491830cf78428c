"""The trustee role: `gridledger trustee run --config FILE`.

A trustee holds one share of the threshold Paillier key and decides, alone and
before any arithmetic, whether what it is asked to decrypt is allowed:

1. the request is signed by the coordinator (BLS);
2. every certificate and MPT proof of an item verifies (`decrypt.check_bill_item`);
3. policy: the item spans at least `min_readings` readings of the account and,
   when it starts from a certified state, at least `min_period_s` seconds of
   reading time; one reading is refused as `single_interval`;
4. no differencing: the trustee remembers every span of readings (the account's
   reading counts at `from` and `to`) it ever decrypted; a new item is refused
   unless, with its span added, every piece between two neighbouring boundaries
   inside the decrypted spans still holds at least `min_readings` readings.
   Otherwise two allowed bills [0, 100) and [0, 101) would subtract to one reading.

An area item (`areatotal`, one interval's total over distinct meters) is
allowed over at least `min_meters` meters, and only if, with the meter sets
already decrypted for that interval, every atom (the readings in exactly the
same sets) still holds at least `min_meters` readings (docs/loadcurves.md).

Every decision, refusals included, is a signed record (BLS, the trustee's own
key) written to SQLite in the same transaction as the boundaries it adds, and
published on `gl/v1/trustees/{name}/decisions`; only then is the partial
decryption computed and sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from certlog import bls
from certlog.block import canonical
from certlog.store import connect
from certlog.validators import ValidatorSet, load_validator_set, read_secret_key
from gridledger.config import MqttConfig, mqtt_section, read_toml, section
from gridledger.errors import ConfigError
from gridledger.logs import event
from gridledger.mqtt import keep_connected, until_stopped

from .areatotal import AreaFacts, check_area_item, set_id, smallest_atom
from .decrypt import (REQUESTS_TOPIC, BillFacts, DecryptError, check_bill_item, check_request, decisions_topic,
                      request_id, response_topic)
from .threshold import KeyShare, load_share

__all__ = ["Policy", "TrusteeSettings", "TrusteeConfig", "Trustee", "TrusteeRole", "load_trustee_config",
           "DECISION_DOMAIN", "verify_decision"]

log = logging.getLogger("gridledger.trustee")

DECISION_DOMAIN = b"gridledger trustee decision v1\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    min_readings: int = 96        # a day of 15-minute readings
    min_period_s: int = 86_400
    min_meters: int = 10          # k: an area total is over at least this many meters

    def __post_init__(self) -> None:
        if self.min_readings < 2 or self.min_period_s < 0 or self.min_meters < 2:
            raise ConfigError("[policy]: min_readings and min_meters must be >= 2 (one reading is never "
                              "decrypted), min_period_s >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrusteeSettings:
    name: str
    database: Path
    share: Path
    secret_key: Path              # BLS key that signs decisions
    coordinator_public: str       # the coordinator's BLS public key, hex
    validators: Path              # validator set of the area chains below
    chains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TrusteeConfig:
    trustee: TrusteeSettings
    policy: Policy = field(default_factory=Policy)
    mqtt: MqttConfig = field(default_factory=MqttConfig)


def load_trustee_config(path: Path) -> TrusteeConfig:
    path = Path(path)
    doc = read_toml(path)
    s = section(TrusteeSettings, doc, "trustee", path.parent, ("database", "share", "secret_key", "validators"))
    if not isinstance(s.chains, (list, tuple)) or not all(isinstance(c, str) for c in s.chains):
        raise ConfigError(f"{path}: [trustee] chains is a list of area chain ids")
    s = dataclasses.replace(s, chains=tuple(s.chains))
    if not s.chains:
        raise ConfigError(f"{path}: [trustee] chains lists the area chains this trustee serves")
    return TrusteeConfig(s, section(Policy, doc, "policy"), mqtt_section(doc, path))


def _finest(spans: set[tuple[int, int]]) -> int:
    """The fewest readings in any piece the decrypted spans could be cut into: the
    gaps between neighbouring boundaries that some span covers. (A sufficient
    bound: any sum an observer can derive from the spans is a sum of such pieces.)"""
    cuts = sorted({c for span in spans for c in span})
    pieces = [b - a for a, b in zip(cuts, cuts[1:]) if any(lo <= a and b <= hi for lo, hi in spans)]
    return min(pieces, default=1 << 62)


def verify_decision(record: dict, public_key: bytes) -> bool:
    """Does `record` (a published decision) carry its trustee's valid signature?"""
    try:
        sig = bytes.fromhex(record["sig"])
    except (KeyError, TypeError, ValueError):
        return False
    body = canonical({k: v for k, v in record.items() if k != "sig"})
    return bls.Verify(public_key, DECISION_DOMAIN + body, sig)


class Trustee:
    """Policy, memory and share of one trustee, with no network in sight."""

    def __init__(self, name: str, share: KeyShare, sk: int, coordinator_public: bytes,
                 validators: dict[str, ValidatorSet], policy: Policy, conn: sqlite3.Connection):
        self.name = name
        self.share = share
        self.key = share.public
        self.sk = sk
        self.coordinator_public = coordinator_public
        self.validators = validators
        self.policy = policy
        self.conn = conn
        self.counts: Counter[str] = Counter()
        conn.executescript("""
            CREATE TABLE IF NOT EXISTS trustee_spans (
                chain TEXT NOT NULL, account TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL,
                PRIMARY KEY (chain, account, lo, hi)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS trustee_decisions (
                id INTEGER PRIMARY KEY, request TEXT NOT NULL, item INTEGER NOT NULL,
                verdict TEXT NOT NULL, reason TEXT, record TEXT NOT NULL, at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS trustee_area_sets (
                chain TEXT NOT NULL, t INTEGER NOT NULL, set_id TEXT NOT NULL, members TEXT NOT NULL,
                PRIMARY KEY (chain, t, set_id)) WITHOUT ROWID;
        """)

    # -- policy ------------------------------------------------------------------------
    def _spans(self, chain: str, account: str) -> set[tuple[int, int]]:
        return set(self.conn.execute("SELECT lo, hi FROM trustee_spans WHERE chain = ? AND account = ?",
                                     (chain, account)).fetchall())

    def _judge(self, f: BillFacts, pending: dict[tuple[str, str], set[tuple[int, int]]]) -> str | None:
        """None to allow, else the reason to refuse; `pending` holds this request's new spans."""
        p = self.policy
        if f.readings == 1:
            return "single_interval"
        if f.readings < p.min_readings:
            return "too_few_readings"
        if f.start.count > 0 and f.end.last_t - f.start.last_t < p.min_period_s:
            return "period_too_short"
        key = (f.chain, f.account)
        spans = (pending.get(key) or self._spans(*key)) | {(f.start.count, f.end.count)}
        if _finest(spans) < p.min_readings:
            return "overlaps_decrypted"
        pending[key] = spans
        return None

    def _area_sets(self, chain: str, t: int) -> list[frozenset[str]]:
        return [frozenset(json.loads(m)) for (m,) in self.conn.execute(
            "SELECT members FROM trustee_area_sets WHERE chain = ? AND t = ?", (chain, t))]

    def _judge_area(self, f: AreaFacts, pending: dict[tuple[str, int], list[frozenset[str]]]) -> str | None:
        """None to allow, else the reason to refuse; `pending` holds this request's new meter sets."""
        k = self.policy.min_meters
        if len(f.meters) < k:
            return "too_few_meters"
        key = (f.chain, f.t)
        sets = pending.get(key) or self._area_sets(*key)
        if f.readings in sets:           # the same question again: nothing new is revealed
            return None
        if smallest_atom([*sets, f.readings]) < k:
            return "overlaps_decrypted"
        pending[key] = [*sets, f.readings]
        return None

    def _check(self, item: object, pending: dict, pending_area: dict):
        """(facts or None, None to allow or the reason to refuse) for one item."""
        try:
            if isinstance(item, dict) and item.get("kind") == "area":
                f = check_area_item(item, self.validators, self.key.kid, self.key.nsquare)
                return f, self._judge_area(f, pending_area)
            f = check_bill_item(item, self.validators, self.key.kid, self.key.nsquare)
            return f, self._judge(f, pending)
        except DecryptError as exc:
            return None, exc.reason

    def decide(self, req_obj: object) -> tuple[dict, list[int], list[dict]]:
        """Check a request: (response without partials, accepted ciphertexts, signed decisions).
        Decisions and new boundaries are durable when this returns."""
        try:
            req = check_request(req_obj, self.coordinator_public)
            rid = request_id(req)
        except DecryptError as exc:
            rid = request_id(req_obj) if isinstance(req_obj, dict) else "-"
            return self._refuse_all(rid, exc)
        verdicts, cs, pending, pending_area, facts = [], [], {}, {}, []
        for i, item in enumerate(req["items"]):
            f, reason = self._check(item, pending, pending_area)
            verdicts.append({"item": i, "status": "refused" if reason else "accepted", "reason": reason})
            facts.append(f)
            if reason is None:
                cs.append(f.c)
        now = int(time.time())
        records = []
        for v, f, item in zip(verdicts, facts, req["items"]):
            area = isinstance(item, dict) and item.get("kind") == "area"
            rec = {"trustee": self.name, "request": rid, "item": v["item"], "verdict": v["status"],
                   "reason": v["reason"], "time": now, "kind": "area" if area else "bill"}
            if isinstance(f, AreaFacts):
                rec.update(chain=f.chain, t=f.t, dt=f.dt, meters=len(f.meters), heights=list(f.heights),
                           set=f.set_id)
            elif f is not None:
                rec.update(chain=f.chain, account=f.account, from_height=f.from_height, to_height=f.to_height,
                           readings=f.readings, from_count=f.start.count, to_count=f.end.count)
            records.append(self._signed(rec))
            self.counts[v["reason"] or "accepted"] += 1
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for (chain, account), spans in pending.items():
                self.conn.executemany("INSERT OR IGNORE INTO trustee_spans VALUES (?, ?, ?, ?)",
                                      [(chain, account, lo, hi) for lo, hi in spans])
            for (chain, t), sets in pending_area.items():
                self.conn.executemany("INSERT OR IGNORE INTO trustee_area_sets VALUES (?, ?, ?, ?)",
                                      [(chain, t, set_id(s), json.dumps(sorted(s))) for s in sets])
            self.conn.executemany(
                "INSERT INTO trustee_decisions(request, item, verdict, reason, record, at) VALUES (?, ?, ?, ?, ?, ?)",
                [(rid, r["item"], r["verdict"], r["reason"], json.dumps(r), time.time()) for r in records])
        return {"request": rid, "trustee": self.name, "index": self.share.index, "items": verdicts}, cs, records

    def _signed(self, rec: dict) -> dict:
        rec["sig"] = bls.Sign(self.sk, DECISION_DOMAIN + canonical(rec)).hex()
        return rec

    def _refuse_all(self, rid: str, exc: DecryptError) -> tuple[dict, list[int], list[dict]]:
        rec = {"trustee": self.name, "request": rid, "item": None, "verdict": "refused", "reason": exc.reason,
               "time": int(time.time()), "kind": "request"}
        self._signed(rec)
        self.counts[exc.reason] += 1
        with self.conn:
            self.conn.execute(
                "INSERT INTO trustee_decisions(request, item, verdict, reason, record, at) VALUES (?, -1, ?, ?, ?, ?)",
                (rid, "refused", exc.reason, json.dumps(rec), time.time()))
        return {"request": rid, "trustee": self.name, "index": self.share.index, "status": "refused",
                "reason": exc.reason, "items": []}, [], [rec]

    def answer(self, req_obj: object) -> tuple[dict, list[dict]]:
        """The full response (with the partial decryption batch) and the decisions."""
        resp, cs, records = self.decide(req_obj)
        resp["partials"] = self.share.partial_batch(cs).to_dict() if cs else None
        return resp, records


def build_trustee(cfg: TrusteeConfig) -> Trustee:
    s = cfg.trustee
    vset = load_validator_set(s.validators)
    try:
        coordinator = bytes.fromhex(s.coordinator_public)
    except ValueError:
        raise ConfigError("[trustee] coordinator_public must be a BLS public key in hex") from None
    share = load_share(s.share)
    return Trustee(s.name, share, read_secret_key(s.secret_key), coordinator, {c: vset for c in s.chains},
                   cfg.policy, connect(s.database))


class TrusteeRole:
    """The process: one request at a time (boundaries must be judged in order)."""

    def __init__(self, cfg: TrusteeConfig):
        self.cfg = cfg
        self.trustee = build_trustee(cfg)

    async def run(self, stop: asyncio.Event) -> None:
        t = self.trustee
        event(log, "start", trustee=t.name, index=t.share.index, kid=t.key.kid, chains=list(t.validators))

        async def consume(client: aiomqtt.Client) -> None:
            async for msg in client.messages:
                await self._handle(client, bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray))
                                   else b"")

        async def serve(client: aiomqtt.Client) -> None:
            await client.publish(f"gl/v1/trustees/{t.name}/key", json.dumps(t.key.to_dict()), qos=1, retain=True)
            await until_stopped(stop, consume(client))

        await keep_connected(self.cfg.mqtt, f"trustee-{t.name}", (REQUESTS_TOPIC,), stop, serve, log)

    async def _handle(self, client: aiomqtt.Client, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError):
            obj = None
        resp, records = await asyncio.to_thread(self.trustee.answer, obj)
        await client.publish(decisions_topic(self.trustee.name), json.dumps(records), qos=1)
        if resp["request"] != "-":
            await client.publish(response_topic(resp["request"]), json.dumps(resp), qos=1)
        accepted = sum(1 for v in resp["items"] if v["status"] == "accepted")
        event(log, "request", request=resp["request"], items=len(resp["items"]), accepted=accepted,
              refused=len(resp["items"]) - accepted, reason=resp.get("reason"))
