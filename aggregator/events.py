"""Signed meter events at the gateway: check, store, ack (format in docs/journal.md,
"Set register (audited)").

A technician's ``set-register`` makes the meter sign a ``gl-event-v1``, journal it
and publish it on ``gl/v1/{area}/meters/{meter}/events``. The gateway checks each
one, cheapest first, stopping at the first failure:

1. shape (``parse_event``): ``oversized`` before decoding, then
   ``malformed_json``, ``missing_field``, ``bad_type``, ``unsupported_version``,
   ``bad_value``; then ``topic_mismatch``;
2. ``unknown_meter`` (not in the registry), ``bad_signature`` (the registry's
   Ed25519 key for that meter, over exactly the signed bytes of docs/journal.md);
3. the event sequence ``eseq`` against the highest one stored for the meter, L:
   ``L + 1`` is accepted; at or below L it is a ``duplicate`` when it is the
   stored event (the meter resent it: acked again, stored once), an
   ``equivocation`` when the stored one differs (the meter signed two events for
   one eseq: kept as evidence), and ``replayed_eseq`` when nothing is held to
   compare with; above ``L + 1`` it is an ``eseq_gap``. Unlike alerts, events
   are an audit trail: a hole in it is refused, counted and logged, never
   stored over.

Accepted events go to the gateway's SQLite (table ``events``; refusals counted
per reason in ``event_rejections``, conflicting ones in ``event_evidence``) in
one transaction per batch; only then does ``{"eseq": E}`` (the meter's highest
stored eseq) go out on the meter's ``.../ack`` topic, and each refusal as
``{"eseq": e, "reason": r}`` on ``.../nack``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
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

__all__ = ["Event", "EventCheck", "EventStore", "EventDesk", "StoredEvent", "parse_event", "event_signed_bytes",
           "make_event", "EVENT_REASON_CLASS", "EVENT_REASONS", "KINDS", "MAX_EVENT", "read_events", "events_topic"]

log = logging.getLogger("gridledger.gateway.events")

VERSION = 1
# A signed set-register event is ~420 bytes; 1 KiB leaves room and keeps a flood cheap to refuse.
MAX_EVENT = 1024
KINDS = ("set_register",)
MAX_WH = (1 << 63) - 1  # the firmware's register bound (firmware/meterstate.py)
EVENT_REASON_CLASS = {
    "oversized": "size",
    "malformed_json": "schema",
    "missing_field": "schema",
    "bad_type": "schema",
    "unsupported_version": "schema",
    "bad_value": "schema",
    "topic_mismatch": "schema",
    "unknown_meter": "unknown_meter",
    "bad_signature": "signature",
    "replayed_eseq": "replayed_seq",
    "equivocation": "equivocation",
    "eseq_gap": "gap",
}
EVENT_REASONS = tuple(EVENT_REASON_CLASS)
# The wire order (firmware/records.py, event_json); ints, then strings.
_FIELDS = ("v", "meter", "eseq", "at", "kind", "seq", "prev", "import_before", "export_before", "import_wh",
           "export_wh", "by", "sig")
_INT_FIELDS = ("v", "eseq", "at", "seq", "import_before", "export_before", "import_wh", "export_wh")
_STR_FIELDS = ("meter", "kind", "prev", "by", "sig")
_BY_RE = re.compile(r"[A-Za-z0-9_.@-]{1,32}\Z")
_HEX64_RE = re.compile(r"[0-9a-f]{64}\Z")
_SIG_RE = re.compile(r"[0-9a-f]{128}\Z")


def events_topic(area: str, meter: str) -> str:
    return f"gl/v1/{area}/meters/{meter}/events"


def event_signed_bytes(meter: str, eseq: int, at: int, kind: str, seq: int, prev: str, import_before: int,
                       export_before: int, import_wh: int, export_wh: int, by: str) -> bytes:
    """gl-event-v1 (docs/journal.md): the CPython twin of records.event_signed_bytes."""
    return "\n".join(("gl-event-v1", meter, str(eseq), str(at), kind, str(seq), prev, str(import_before),
                      str(export_before), str(import_wh), str(export_wh), by)).encode("ascii")


@dataclass(frozen=True, slots=True)
class Event:
    meter: str
    eseq: int
    at: int
    kind: str
    seq: int  # the last reading's seq before the event
    prev: str  # that reading's hash: the event's place in the reading chain
    import_before: int
    export_before: int
    import_wh: int
    export_wh: int
    by: str
    sig: str
    v: int = VERSION
    signed_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "signed_bytes", event_signed_bytes(
            self.meter, self.eseq, self.at, self.kind, self.seq, self.prev, self.import_before,
            self.export_before, self.import_wh, self.export_wh, self.by))

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.signed_bytes).hexdigest()

    def to_json(self) -> bytes:
        """Canonical JSON: the wire order, no spaces (what is stored and compared)."""
        return json.dumps({k: getattr(self, k) for k in _FIELDS}, separators=(",", ":")).encode()


def make_event(*, meter: str, eseq: int, at: int, seq: int, prev: str, import_before: int, export_before: int,
               import_wh: int, export_wh: int, by: str, sign: Callable[[bytes], bytes]) -> Event:
    """A set-register event signed with `sign` (tests, and the known answers)."""
    sig = sign(event_signed_bytes(meter, eseq, at, "set_register", seq, prev, import_before, export_before,
                                  import_wh, export_wh, by)).hex()
    return Event(meter, eseq, at, "set_register", seq, prev, import_before, export_before, import_wh, export_wh,
                 by, sig)


def parse_event(payload: bytes, max_size: int = MAX_EVENT) -> Event:
    """An event from its JSON payload, or `Rejected` with the reason."""
    obj, eseq = signed_json(payload, max_size, VERSION, "eseq", _INT_FIELDS, _STR_FIELDS, _FIELDS)
    if obj["kind"] not in KINDS:
        raise Rejected("bad_value", f"kind {obj['kind'][:20]!r}", seq=eseq)
    if obj["eseq"] < 1 or obj["at"] < 0 or obj["seq"] < 0:
        raise Rejected("bad_value", "eseq >= 1, at >= 0, seq >= 0", seq=eseq)
    if not all(0 <= obj[k] <= MAX_WH for k in ("import_before", "export_before", "import_wh", "export_wh")):
        raise Rejected("bad_value", "register values must be 0 .. 2^63-1 Wh", seq=eseq)
    if not _BY_RE.match(obj["by"]):
        raise Rejected("bad_value", "by: 1-32 characters from A-Z a-z 0-9 _ . @ -", seq=eseq)
    if not _HEX64_RE.match(obj["prev"]) or not _SIG_RE.match(obj["sig"]):
        raise Rejected("bad_value", "prev and sig are lowercase hex of 64 and 128 digits", seq=eseq)
    extra = set(obj) - set(_FIELDS)
    if extra:
        raise Rejected("bad_value", f"unknown fields {sorted(extra)[:4]}", seq=eseq)
    return Event(*(obj[k] for k in _FIELDS[1:-1]), obj["sig"])


@dataclass
class EventCheck(MessageCheck):
    """The gateway's decision on one event: pure logic over the registry, the highest
    stored eseq per meter and a lookup of a stored event's canonical JSON."""
    registry: Registry
    last: dict[str, int]
    stored: Callable[[str, int], bytes | None]
    counts: Counter = field(default_factory=Counter)
    # accepted in the batch being checked, not yet committed: a resend in the
    # same batch is a duplicate of these
    _pending: dict[tuple[str, int], bytes] = field(default_factory=dict)

    def _check(self, topic_meter: str, payload: bytes) -> Verdict:
        e = parse_event(payload)
        self._signed_by_topic_meter(topic_meter, e, e.eseq, "event eseq")
        last = self.last.get(e.meter, 0)
        if e.eseq == last + 1:
            self.last[e.meter] = e.eseq
            self._pending[(e.meter, e.eseq)] = e.to_json()
            return Verdict("accept", item=e, seq=e.eseq)
        if e.eseq > last:
            raise Rejected("eseq_gap", f"expected eseq {last + 1}, got {e.eseq}", seq=e.eseq)
        held = self._pending.get((e.meter, e.eseq))
        if held is None:
            held = self.stored(e.meter, e.eseq)
        if held == e.to_json():
            return Verdict("duplicate", item=e, seq=e.eseq)
        if held is None:
            raise Rejected("replayed_eseq", f"eseq {e.eseq} is at or below {last} and no longer held", seq=e.eseq)
        return Verdict("reject", item=e, reason="equivocation", seq=e.eseq, evidence=True,
                       detail=f"eseq {e.eseq} already holds a different event")

    def committed(self) -> None:
        self._pending.clear()

    def rolled_back(self, last: dict[str, int]) -> None:
        self._pending.clear()
        self.last = last


@dataclass(frozen=True, slots=True)
class StoredEvent:
    meter: str
    eseq: int
    at: int
    kind: str
    seq: int
    import_before: int
    export_before: int
    import_wh: int
    export_wh: int
    by: str
    hash: str
    received_at: float


class EventStore:
    """The gateway's events in its own SQLite tables (WAL, synchronous=FULL)."""

    def __init__(self, path: Path | str):
        self.db = sqlite_utils.Database(connect(path))
        if not self.db["events"].exists():
            self.db["events"].create({"meter": str, "eseq": int, "at": int, "kind": str, "seq": int, "prev": str,
                                      "import_before": int, "export_before": int, "import_wh": int,
                                      "export_wh": int, "by": str, "sig": str, "hash": str, "payload": str,
                                      "received_at": float}, pk=("meter", "eseq"))
        if not self.db["event_evidence"].exists():
            self.db["event_evidence"].create({"id": int, "meter": str, "eseq": int, "reason": str, "payload": str,
                                              "received_at": float}, pk="id")
        if not self.db["event_rejections"].exists():
            self.db["event_rejections"].create({"reason": str, "count": int}, pk="reason")

    def last_eseqs(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT meter, MAX(eseq) FROM events GROUP BY meter").fetchall())

    def payload(self, meter: str, eseq: int) -> bytes | None:
        row = self.db.execute("SELECT payload FROM events WHERE meter=? AND eseq=?", [meter, eseq]).fetchone()
        return row[0].encode() if row else None

    def commit(self, accepted: list[Event], evidence: list[tuple[Event, str]], rejections: dict[str, int]) -> None:
        now = time.time()
        conn = self.db.conn
        with immediate(conn):
            conn.executemany(
                "INSERT INTO events(meter, eseq, at, kind, seq, prev, import_before, export_before, import_wh, "
                "export_wh, by, sig, hash, payload, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.meter, e.eseq, e.at, e.kind, e.seq, e.prev, e.import_before, e.export_before, e.import_wh,
                  e.export_wh, e.by, e.sig, e.hash, e.to_json().decode(), now) for e in accepted])
            conn.executemany(
                "INSERT INTO event_evidence(meter, eseq, reason, payload, received_at) VALUES (?, ?, ?, ?, ?)",
                [(e.meter, e.eseq, reason, e.to_json().decode(), now) for e, reason in evidence])
            conn.executemany(
                "INSERT INTO event_rejections(reason, count) VALUES (?, ?) "
                "ON CONFLICT(reason) DO UPDATE SET count = count + excluded.count", list(rejections.items()))

    def close(self) -> None:
        self.db.conn.close()


def read_events(path: Path | str, meter: str | None = None,
                limit: int = 100) -> tuple[list[StoredEvent], dict[str, int]]:
    """The newest `limit` stored events (oldest first) and the refusal counts, read-only:
    safe beside a running gateway."""
    rows, counts = read_newest(path, "events", "meter, eseq, at, kind, seq, import_before, export_before, "
                               "import_wh, export_wh, by, hash, received_at", "eseq", "event_rejections", meter, limit)
    return [StoredEvent(*r) for r in rows], counts


class EventDesk(MessageDesk):
    """The gateway's event path (``desk.MessageDesk``): ``{"eseq": E}`` acks."""
    suffix, seq_field, name, what = "events", "eseq", "event", "signed meter events"
    reason_class = EVENT_REASON_CLASS

    def __init__(self, registry: Registry, database: Path, area: str):
        self.store = EventStore(database)
        super().__init__(area, EventCheck(registry, self.store.last_eseqs(), self.store.payload))

    def _commit(self, accepted: list[Event], evidence: list[tuple[Event, str]], rejected: Counter) -> None:
        self.store.commit(accepted, evidence, rejected)

    def _stored_last(self) -> dict[str, int]:
        return self.store.last_eseqs()

    def _accepted(self, e: Event) -> None:
        event(log, "meter_event", meter=e.meter, eseq=e.eseq, kind=e.kind, seq=e.seq, by=e.by,
              before=[e.import_before, e.export_before], after=[e.import_wh, e.export_wh])

    def close(self) -> None:
        self.store.close()
