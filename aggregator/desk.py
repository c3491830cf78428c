"""What the gateway's paths for signed meter messages other than readings share
(device alerts, ``alerts.py``; set-register events, ``events.py``): a check that
turns every failure into a counted verdict with a reason, and a desk that
drains a queue in batches, commits each batch durably, and only then acks and
nacks on the meter's ``.../ack`` and ``.../nack`` topics (the only ones a meter
may read under the broker's ACL).
"""

from __future__ import annotations

import asyncio
import sqlite3
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiomqtt

from gridledger.errors import Rejected
from gridledger.logs import event
from gridledger.metrics import Snapshot
from gridledger.wire import METER_ID_RE, ack_topic, nack_topic

__all__ = ["Verdict", "MessageCheck", "MessageDesk", "read_newest", "signed_json"]

_BATCH_MAX = 256
_QUEUE_MAX = 5000


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Literal["accept", "duplicate", "reject"]
    item: Any = None  # the parsed message (an Alert, an Event), when it got that far
    reason: str | None = None
    detail: str = ""
    seq: int | None = None
    evidence: bool = False  # validly signed, and in conflict with what is stored


def signed_json(payload: bytes, max_size: int, version: int, seq_field: str, int_fields: tuple[str, ...],
                str_fields: tuple[str, ...], order: tuple[str, ...] | None = None) -> tuple[dict, int | None]:
    """The checks every signed meter message (alert, event) starts with, in order: size,
    a UTF-8 JSON object, every field present (in `order`), ints and strings of exact
    type, the version, the meter id. `Rejected` with the reason, else the object and
    its sequence number (`seq_field`, None when unreadable)."""
    if len(payload) > max_size:
        raise Rejected("oversized", f"{len(payload)} bytes > {max_size}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Rejected("malformed_json", str(exc)[:120]) from None
    if not isinstance(obj, dict):
        raise Rejected("malformed_json", "not a JSON object")
    seq = obj.get(seq_field) if type(obj.get(seq_field)) is int else None
    for k in order or (*int_fields, *str_fields):
        if k not in obj:
            raise Rejected("missing_field", k, seq=seq)
    for k in int_fields:
        if type(obj[k]) is not int:
            raise Rejected("bad_type", f"{k} must be an integer", seq=seq)
    for k in str_fields:
        if type(obj[k]) is not str:
            raise Rejected("bad_type", f"{k} must be a string", seq=seq)
    if obj["v"] != version:
        raise Rejected("unsupported_version", f"v {obj['v']}", seq=seq)
    if not METER_ID_RE.match(obj["meter"]):
        raise Rejected("bad_value", "meter id", seq=seq)
    return obj, seq


class MessageCheck:
    """The decision on one message: `_check` raises `Rejected` or returns a verdict;
    `check` never raises, and counts every outcome by its reason or kind. A subclass
    (a dataclass) has `last`, the highest stored sequence number per meter (what acks
    carry), and `counts`."""
    last: dict[str, int]
    counts: Counter

    def check(self, topic_meter: str, payload: bytes) -> Verdict:
        try:
            v = self._check(topic_meter, payload)
        except Rejected as r:
            v = Verdict("reject", reason=r.reason, detail=r.detail, seq=r.seq)
        except Exception as exc:  # a bug must refuse the message, not accept it or stop the gateway
            v = Verdict("reject", reason="malformed_json", detail=f"unexpected {exc!r}"[:160])
        self.counts[v.reason or v.kind] += 1
        return v

    def _check(self, topic_meter: str, payload: bytes) -> Verdict:
        raise NotImplementedError

    def _signed_by_topic_meter(self, topic_meter: str, m: Any, seq: int, what: str) -> None:
        """Refuse `m` (with `meter`, `signed_bytes` and `sig`) unless it names the topic's
        meter, that meter is registered (`self.registry`), and its key signed `m`."""
        if m.meter != topic_meter:
            raise Rejected("topic_mismatch", f"topic meter {topic_meter!r}, payload meter {m.meter!r}", seq=seq)
        if m.meter not in self.registry:
            raise Rejected("unknown_meter", m.meter, seq=seq)
        try:
            ok = self.registry.verify(m.meter, m.signed_bytes, bytes.fromhex(m.sig))
        except Exception:  # a verifier that cannot decide has not verified
            ok = False
        if not ok:
            raise Rejected("bad_signature", f"{what} {seq}", seq=seq)

    def committed(self) -> None:
        """The batch checked since the last call is durable."""

    def rolled_back(self, last: dict[str, int]) -> None:
        """The batch was not stored: `last` is what the store holds."""
        self.last = last


class MessageDesk:
    """A queue fed by the gateway's MQTT reader and one worker: check a batch, commit
    it in one transaction, then ack ``{seq_field: S}`` per meter (its highest stored
    sequence number) and nack each refusal ``{seq_field: s, "reason": r}``."""
    suffix = ""      # the topic's last level: gl/v1/{area}/meters/{meter}/{suffix}
    seq_field = ""   # the sequence number's key in acks and nacks
    name = ""        # in log events ("{name}_rejected") and metric names
    what = ""        # in metric help: "device alerts"
    reason_class: dict[str, str] = {}

    def __init__(self, area: str, check: MessageCheck):
        self.area = area
        self.check = check
        self.queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue(_QUEUE_MAX)
        self._prefix = f"gl/v1/{area}/meters/"
        self.log = logging.getLogger(f"gridledger.gateway.{self.suffix}")

    # What a subclass provides.
    def _commit(self, accepted: list, evidence: list[tuple[Any, str]], rejected: Counter) -> None:
        raise NotImplementedError

    def _stored_last(self) -> dict[str, int]:
        raise NotImplementedError

    def _accepted(self, item: Any) -> None:
        """Log an accepted message."""

    def close(self) -> None:
        raise NotImplementedError

    # The desk.
    def topic(self) -> str:
        return f"{self._prefix}+/{self.suffix}"

    def handles(self, topic: str) -> bool:
        return topic.startswith(self._prefix) and topic.endswith("/" + self.suffix)

    def counters(self) -> dict[str, int]:
        out = dict.fromkeys((*self.reason_class, "accept", "duplicate"), 0)
        out.update(self.check.counts)
        return out

    def metrics(self) -> list[Snapshot]:
        counts = self.counters()
        classes = dict.fromkeys(self.reason_class.values(), 0)
        for reason, cls in self.reason_class.items():
            classes[cls] += counts[reason]
        what = self.what
        return [
            Snapshot(f"gridledger_{self.name}s", f"{what} by verdict (accept, duplicate) or rejection reason",
                     "counter", ("result",), {(k,): v for k, v in counts.items()}),
            Snapshot(f"gridledger_{self.name}_rejections_by_class", f"refused {what} by class", "counter",
                     ("class",), {(k,): v for k, v in classes.items()}),
        ]

    async def run(self, client: aiomqtt.Client) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < _BATCH_MAX and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._process(client, batch)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _process(self, client: aiomqtt.Client, batch: list[aiomqtt.Message]) -> None:
        accepted: list = []
        evidence: list[tuple[Any, str]] = []
        rejected: Counter[str] = Counter()
        acks: set[str] = set()
        nacks: list[tuple[str, dict]] = []
        for msg in batch:
            meter = msg.topic.value[len(self._prefix):-len(self.suffix) - 1]
            payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else str(msg.payload).encode()
            v = self.check.check(meter, bytes(payload))
            if v.kind == "reject":
                rejected[v.reason] += 1
                if v.evidence:
                    evidence.append((v.item, v.reason))
                event(self.log, f"{self.name}_rejected", logging.WARNING, meter=meter, seq=v.seq, reason=v.reason,
                      detail=v.detail)
                if METER_ID_RE.match(meter):
                    nacks.append((meter, {self.seq_field: v.seq, "reason": v.reason}))
                continue
            if v.kind == "accept":
                accepted.append(v.item)
                self._accepted(v.item)
            acks.add(meter)
        try:
            await asyncio.to_thread(self._commit, accepted, evidence, rejected)
        except BaseException:
            self.check.rolled_back(self._stored_last())  # nothing of this batch was stored
            raise
        self.check.committed()
        await asyncio.gather(
            *(client.publish(ack_topic(self.area, m), json.dumps({self.seq_field: self.check.last[m]}), qos=1)
              for m in sorted(acks)),
            *(client.publish(nack_topic(self.area, m), json.dumps(body), qos=1) for m, body in nacks))


def read_newest(path: Path | str, table: str, columns: str, seq_column: str, rejections: str,
                meter: str | None, limit: int) -> tuple[list[tuple], dict[str, int]]:
    """The newest `limit` rows of `table` (oldest first), for one meter or all, and the
    refusal counts in `rejections`; read-only, so safe beside a running gateway.
    ([], {}) before the gateway has made the tables."""
    if not Path(path).exists():
        return [], {}
    sql = f"SELECT {columns} FROM {table}"
    args: list = []
    if meter is not None:
        sql += " WHERE meter = ?"
        args.append(meter)
    sql += f" ORDER BY received_at DESC, meter DESC, {seq_column} DESC LIMIT ?"
    args.append(limit)
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute(sql, args).fetchall()
            counts = dict(conn.execute(f"SELECT reason, count FROM {rejections}").fetchall())
    except sqlite3.OperationalError:
        return [], {}
    return rows[::-1], counts
