"""Device-side alerts at the gateway: check, store, ack (format in docs/alerts.md).

A meter judges its own plaintext against thresholds and publishes signed alerts
on ``gl/v1/{area}/meters/{meter}/alerts``. The gateway checks each one, cheapest
first, stopping at the first failure:

1. shape (``parse_alert``): ``oversized`` before decoding, then
   ``malformed_json``, ``missing_field``, ``bad_type``, ``unsupported_version``,
   ``bad_value``; then ``topic_mismatch``;
2. ``unknown_meter`` (not in the registry), ``bad_signature`` (the registry's
   Ed25519 key for that meter);
3. the alert seq: above every seq stored for the meter, it is accepted; at or
   below, it is a ``duplicate`` when the stored alert at that seq is the same
   one (the meter missed its ack: acked again, stored once), otherwise
   ``replayed_seq``. Gaps are allowed: a meter whose outbox overflowed dropped
   its oldest alerts, and says so in its health message.

Accepted alerts go to the gateway's SQLite (table ``alerts``, refusals counted
per reason in ``alert_rejections``) in one transaction per batch; only then
does ``{"alert_seq": S}`` (the meter's highest stored alert seq) go out on the
meter's ``.../ack`` topic, beside its reading acks (the only topics a meter may
read under the broker's ACL). A refusal is answered on ``.../nack`` with
``{"alert_seq": s, "reason": r}``, and the meter stops resending that alert.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import sqlite_utils

from certlog.store import connect, immediate
from gridledger.errors import Rejected
from gridledger.logs import event

from .desk import MessageCheck, MessageDesk, Verdict, read_newest, signed_json
from .registry import Registry

__all__ = ["Alert", "AlertCheck", "AlertStore", "AlertDesk", "StoredAlert", "parse_alert",
           "alert_signed_bytes", "make_alert", "ALERT_REASON_CLASS", "ALERT_REASONS", "KINDS", "STATES",
           "MAX_ALERT", "read_alerts", "alerts_topic"]

log = logging.getLogger("gridledger.gateway.alerts")

VERSION = 1
# A signed alert is ~300 bytes; 1 KiB leaves room and keeps a flood cheap to refuse.
MAX_ALERT = 1024
KINDS = ("power_high", "power_low", "temp_high")
STATES = ("raised", "cleared")
# Every reason an alert can be refused for, in check order, with its class.
ALERT_REASON_CLASS = {
    "oversized": "size",
    "malformed_json": "schema",
    "missing_field": "schema",
    "bad_type": "schema",
    "unsupported_version": "schema",
    "bad_value": "schema",
    "topic_mismatch": "schema",
    "unknown_meter": "unknown_meter",
    "bad_signature": "signature",
    "replayed_seq": "replayed_seq",
}
ALERT_REASONS = tuple(ALERT_REASON_CLASS)
# Values are ints on the wire (W, tenths of a degree); bound them to what a
# household meter can mean, so a signed alert cannot carry a huge number.
_VALUE_MAX = 10 ** 9
_INT_FIELDS = ("v", "seq", "t", "value", "threshold")
_STR_FIELDS = ("meter", "kind", "state", "sig")


def alerts_topic(area: str, meter: str) -> str:
    return f"gl/v1/{area}/meters/{meter}/alerts"


def alert_signed_bytes(meter: str, seq: int, t: int, kind: str, value: int, threshold: int, state: str) -> bytes:
    return "\n".join(("gl-alert-v1", meter, str(seq), str(t), kind, str(value), str(threshold),
                      state)).encode("ascii")


@dataclass(frozen=True, slots=True)
class Alert:
    meter: str
    seq: int
    t: int
    kind: str
    value: int
    threshold: int
    state: str
    sig: str
    v: int = VERSION
    signed_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "signed_bytes", alert_signed_bytes(
            self.meter, self.seq, self.t, self.kind, self.value, self.threshold, self.state))

    def to_json(self) -> bytes:
        """Canonical JSON: keys sorted, no spaces (the firmware writes the same bytes)."""
        return json.dumps({"v": self.v, "meter": self.meter, "seq": self.seq, "t": self.t, "kind": self.kind,
                           "value": self.value, "threshold": self.threshold, "state": self.state,
                           "sig": self.sig}, sort_keys=True, separators=(",", ":")).encode()


def make_alert(*, meter: str, seq: int, t: int, kind: str, value: int, threshold: int, state: str,
               sign: Callable[[bytes], bytes]) -> Alert:
    sig = sign(alert_signed_bytes(meter, seq, t, kind, value, threshold, state)).hex()
    return Alert(meter, seq, t, kind, value, threshold, state, sig)


def parse_alert(payload: bytes, max_size: int = MAX_ALERT) -> Alert:
    """An alert from its JSON payload, or `Rejected` with the reason."""
    obj, seq = signed_json(payload, max_size, VERSION, "seq", _INT_FIELDS, _STR_FIELDS)
    if obj["seq"] < 1 or obj["t"] < 0:
        raise Rejected("bad_value", "seq must be >= 1 and t >= 0", seq=seq)
    if obj["kind"] not in KINDS or obj["state"] not in STATES:
        raise Rejected("bad_value", f"kind {obj['kind'][:20]!r} / state {obj['state'][:20]!r}", seq=seq)
    if abs(obj["value"]) > _VALUE_MAX or abs(obj["threshold"]) > _VALUE_MAX:
        raise Rejected("bad_value", "value or threshold out of range", seq=seq)
    sig = obj["sig"]
    if len(sig) != 128 or not sig.isascii() or any(ch not in "0123456789abcdef" for ch in sig):
        raise Rejected("bad_value", "sig must be 128 lowercase hex digits", seq=seq)
    extra = set(obj) - set(_INT_FIELDS) - set(_STR_FIELDS)
    if extra:
        raise Rejected("bad_value", f"unknown fields {sorted(extra)[:4]}", seq=seq)
    return Alert(obj["meter"], obj["seq"], obj["t"], obj["kind"], obj["value"], obj["threshold"], obj["state"], sig)


@dataclass
class AlertCheck(MessageCheck):
    """The gateway's decision on one alert: pure logic over the registry, the highest
    stored seq per meter and a lookup of a stored alert's payload."""
    registry: Registry
    last: dict[str, int]
    stored: Callable[[str, int], bytes | None]
    counts: Counter = field(default_factory=Counter)

    def _check(self, topic_meter: str, payload: bytes) -> Verdict:
        a = parse_alert(payload)
        self._signed_by_topic_meter(topic_meter, a, a.seq, "alert seq")
        last = self.last.get(a.meter, 0)
        if a.seq > last:
            self.last[a.meter] = a.seq
            return Verdict("accept", item=a, seq=a.seq)
        if self.stored(a.meter, a.seq) == a.to_json():
            return Verdict("duplicate", item=a, seq=a.seq)
        raise Rejected("replayed_seq", f"alert seq {a.seq} is at or below {last} and is not the stored one",
                       seq=a.seq)


@dataclass(frozen=True, slots=True)
class StoredAlert:
    meter: str
    seq: int
    t: int
    kind: str
    value: int
    threshold: int
    state: str
    received_at: float


class AlertStore:
    """The gateway's alerts in its own SQLite tables (WAL, synchronous=FULL)."""

    def __init__(self, path: Path | str):
        self.db = sqlite_utils.Database(connect(path))
        if not self.db["alerts"].exists():
            self.db["alerts"].create({"meter": str, "seq": int, "t": int, "kind": str, "value": int,
                                      "threshold": int, "state": str, "payload": str, "received_at": float},
                                     pk=("meter", "seq"))
            self.db["alerts"].create_index(["t"])
        if not self.db["alert_rejections"].exists():
            self.db["alert_rejections"].create({"reason": str, "count": int}, pk="reason")

    def last_seqs(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT meter, MAX(seq) FROM alerts GROUP BY meter").fetchall())

    def payload(self, meter: str, seq: int) -> bytes | None:
        row = self.db.execute("SELECT payload FROM alerts WHERE meter=? AND seq=?", [meter, seq]).fetchone()
        return row[0].encode() if row else None

    def commit(self, accepted: list[Alert], rejections: dict[str, int]) -> None:
        now = time.time()
        conn = self.db.conn
        with immediate(conn):
            conn.executemany(
                "INSERT INTO alerts(meter, seq, t, kind, value, threshold, state, payload, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(a.meter, a.seq, a.t, a.kind, a.value, a.threshold, a.state, a.to_json().decode(), now)
                 for a in accepted])
            conn.executemany(
                "INSERT INTO alert_rejections(reason, count) VALUES (?, ?) "
                "ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count", list(rejections.items()))

    def close(self) -> None:
        self.db.conn.close()


def read_alerts(path: Path | str, meter: str | None = None,
                limit: int = 100) -> tuple[list[StoredAlert], dict[str, int]]:
    """The newest `limit` stored alerts (oldest first) and the refusal counts, read-only:
    safe beside a running gateway."""
    rows, counts = read_newest(path, "alerts", "meter, seq, t, kind, value, threshold, state, received_at", "seq",
                               "alert_rejections", meter, limit)
    return [StoredAlert(*r) for r in rows], counts


class AlertDesk(MessageDesk):
    """The gateway's alert path (``desk.MessageDesk``): ``{"alert_seq": S}`` acks."""
    suffix, seq_field, name, what = "alerts", "alert_seq", "alert", "device alerts"
    reason_class = ALERT_REASON_CLASS

    def __init__(self, registry: Registry, database: Path, area: str):
        self.store = AlertStore(database)
        super().__init__(area, AlertCheck(registry, self.store.last_seqs(), self.store.payload))

    def _commit(self, accepted: list[Alert], evidence: list, rejected: Counter) -> None:
        self.store.commit(accepted, rejected)

    def _stored_last(self) -> dict[str, int]:
        return self.store.last_seqs()

    def _accepted(self, a: Alert) -> None:
        event(log, "alert", meter=a.meter, seq=a.seq, t=a.t, kind=a.kind, state=a.state, value=a.value,
              threshold=a.threshold)

    def close(self) -> None:
        self.store.close()
