"""The gateway role: MQTT ingest -> checks -> SQLite -> ack.

Readings arrive on their own lean MQTT session (`gridledger.mqttlink`) into a
bounded inbox; one worker drains it in batches, checks each reading, writes the
batch in one durable transaction, and only then publishes the acks, a batch's
in one socket write. A bad message is counted, logged and answered with a nack;
it never stops the loop. Chain votes, sync and alerts use an aiomqtt session.

Why a session of its own (measured with bench/ingest.py and py-spy, per
reading on the gateway's core): through aiomqtt a reading cost paho's parsing
(about 30 µs for a 1.3 KB message) plus a `Message`, a parsed `Topic` and a
queue hop, and each awaited QoS 1 ack a future and a PUBACK wake-up: together
more than an Ed25519 verify.

Acks (and nacks) go out at QoS 0. An ack is cumulative ("every reading up to S
is durable"), so a later ack supersedes a lost one, and a meter that misses one
resends the reading, which is acked again as a duplicate (DESIGN §4's resend
path, exercised by the broker-down tests). For the same end-to-end reason the
gateway takes readings from the broker at QoS 0 (meters still publish at
QoS 1, so the broker acknowledges each one to its meter): QoS 1 delivery would
cost a PUBACK per reading and buy nothing, since only the gateway's own ack
after the durable commit lets a meter drop a reading. A reading lost between
broker and gateway (a gateway crash, a dropped connection, readings published
while the gateway is down) is resent by its meter when no ack comes; the crash
tests kill the gateway under load and find every acked reading in the chain once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from gridledger.config import MqttConfig, mqtt_section, read_toml, section
from gridledger.errors import ConfigError
from gridledger.logs import event
from gridledger.mqtt import keep_connected
from gridledger.mqttlink import LinkSession
from gridledger.metrics import MetricsConfig, Snapshot, serve as serve_metrics
from gridledger.paillier import load_public
from gridledger.wire import METER_ID_RE, ack_topic, nack_topic

from .alerts import AlertDesk
from .areaapp import AreaApp
from .chain import AreaChain
from .events import EventDesk
from .ingest import REASONS, Ingest, class_counts
from .registry import load_registry
from coordinator.registry import RegistryChainSettings, registry_node
from .store import GatewayStore

__all__ = ["GatewayConfig", "ChainSettings", "Gateway", "load_gateway_config"]

log = logging.getLogger("gridledger.gateway")

# Batching trades latency for fsyncs and per-batch work: one fsync, one thread hop and
# one write of acks per batch. 50 ms keeps the ack latency far below a meter's resend
# timer (seconds) and near what one fsync takes on a Raspberry Pi's SD card anyway;
# against 20 ms it saved about 5 µs per reading at 2,000-3,000 readings/s.
BATCH_MAX = 512
BATCH_WAIT_S = 0.05
# ... unless the inflow pauses: no reading for this long, and the batch goes with what
# came (group commit). Meters whose next reading waits on an ack (a window of resends,
# a loadgen) would otherwise leave the gateway idle to the end of BATCH_WAIT_S, every
# batch; a steady inflow (arrivals well under this apart) still fills batches.
BATCH_GAP_S = 0.005
# After a short read, the reading link leaves the socket alone this long, so what
# arrives meanwhile is read in one go: at 256 readings in flight, 2,400 reads of two
# or three readings each became 120 of about fifty, and the gateway's CPU per
# reading fell by about 5 µs (bench/ingest.py --quick). Interrupt coalescing, as a
# network card does it; acks wait at most this much longer.
READ_COALESCE_S = 0.002
# Readings waiting for the checker. Beyond it a reading is shed (counted as
# `overload`, not acked): its meter keeps it in its journal and resends it.
QUEUE_MAX = 20000
STATUS_EVERY_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    area: str
    database: Path
    paillier_public: Path
    registry: Path | None = None  # a static registry file; or follow [registry_chain]
    max_payload: int = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainSettings:
    """The area chain the gateway proposes (absent: the gateway only stores readings)."""
    validators: Path
    proposer_key: Path         # the gateway's BLS key as the chain's proposer
    block_max: int = 1000      # readings and alerts per block
    block_wait_s: float = 0.2  # after a certificate, wait this long for a fuller block
    resend_s: float = 2.0      # re-send a proposal that has not gathered 2f+1 votes


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    gateway: GatewaySettings
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    chain: ChainSettings | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    registry_chain: RegistryChainSettings | None = None


def load_gateway_config(path: Path) -> GatewayConfig:
    path = Path(path)
    doc = read_toml(path)
    gw = section(GatewaySettings, doc, "gateway", path.parent, ("database", "registry", "paillier_public"))
    if not METER_ID_RE.match(gw.area):
        raise ConfigError(f"area id {gw.area!r} must match [A-Za-z0-9_-]{{1,32}}")
    chain = section(ChainSettings, doc, "chain", path.parent, ("validators", "proposer_key")) if "chain" in doc else None
    if chain is not None and not 1 <= chain.block_max <= 100_000:
        raise ConfigError("[chain] block_max must be between 1 and 100000")
    registry_chain = RegistryChainSettings.from_doc(doc, path.parent)
    if (gw.registry is None) == (registry_chain is None):
        raise ConfigError(f"{path}: give either [gateway] registry (a file) or a [registry_chain] table")
    return GatewayConfig(gw, mqtt_section(doc, path), chain, section(MetricsConfig, doc, "metrics"),
                         registry_chain)


class Gateway:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        s = cfg.gateway
        self.area = s.area
        self.store = GatewayStore(s.database)
        self.registry_node = None  # with [registry_chain]: this gateway's follower of the registry chain
        if cfg.registry_chain is not None:
            self.registry_node, history = registry_node(cfg.registry_chain, cfg.mqtt, f"gateway-{self.area}")
            self.registry = history.view(self.area)  # ingest: whoever is enrolled as of the latest block
            source = history                         # blocks: membership at the height they name
        else:
            self.registry = source = load_registry(s.registry)
        paillier = load_public(s.paillier_public)
        self.ingest = Ingest(self.registry, paillier, self.store.heads(),
                             self.store.stored_hash, max_payload=s.max_payload)
        self._prefix = f"gl/v1/{self.area}/meters/"
        # (topic, payload) of readings not yet checked, filled by the link's callback.
        self.inbox: deque[tuple[str, bytes]] = deque()
        # Set by the callback once the inbox holds what the batch being gathered still needs.
        self._enough = asyncio.Event()
        self._wanted = 1
        self._busy = False  # a batch is being checked, stored or acked
        self._accepting = True  # False once stopping: what arrives then is left to the meters' resends
        mqtt = cfg.mqtt  # the reading path's own MQTT session (gridledger/mqttlink.py)
        self.readings = LinkSession(mqtt, f"{mqtt.client_id or f'gateway-{self.area}'}-readings",
                                    f"{self._prefix}+/readings", self._on_reading, log, name="readings",
                                    coalesce_s=READ_COALESCE_S)
        self.batches = 0
        self.shed = 0       # readings refused for a full inbox
        self.unsent = 0     # acks not written: the reading link was down
        self.alerts = AlertDesk(self.registry, s.database, self.area)
        self.events = EventDesk(self.registry, s.database, self.area)
        self.chain: AreaChain | None = None
        if cfg.chain is not None:
            self.chain = AreaChain(cfg.chain, self.area, s.database, self.store,
                                   AreaApp(self.area, source, paillier))

    def counters(self) -> dict[str, int]:
        out = {r: 0 for r in REASONS}
        out.update({"accept": 0, "duplicate": 0})
        out.update(self.ingest.counts)
        out["overload"] = self.shed
        return out

    def metrics(self) -> list[Snapshot]:
        counts = self.counters()
        out = [
            Snapshot("gridledger_ingest_readings", "readings by verdict (accept, duplicate) or rejection reason",
                     "counter", ("result",), {(k,): v for k, v in counts.items()}),
            Snapshot("gridledger_ingest_rejections_by_class", "rejections by the issue's reason classes",
                     "counter", ("class",), {(k,): v for k, v in class_counts(counts).items()}),
            Snapshot("gridledger_ingest_queue", "messages waiting for the checker", "gauge", (),
                     {(): len(self.inbox)}),
            Snapshot("gridledger_ingest_batches", "durable ingest transactions", "counter", (), {(): self.batches}),
            Snapshot("gridledger_ingest_acks_unsent", "acks not queued: MQTT was down (the meter resends)",
                     "counter", (), {(): self.unsent}),
            Snapshot("gridledger_ingest_link_dropped", "messages the reading link dropped unread, by reason",
                     "counter", ("reason",), {(k,): v for k, v in self.readings.dropped().items()}),
            Snapshot("gridledger_ingest_link_io", "the reading link's socket reads and messages received "
                     "(their ratio: messages per wake-up, see READ_COALESCE_S)",
                     "counter", ("kind",), {(k,): v for k, v in self.readings.io().items()}),
        ]
        out += self.alerts.metrics()
        out += self.events.metrics()
        if self.chain is not None:
            out += self.chain.metrics()
        return out

    def _topic_meter(self, topic: str) -> str:
        # gl/v1/{area}/meters/{meter}/readings
        return topic[len(self._prefix):-len("/readings")]

    async def run(self, stop: asyncio.Event) -> None:
        serve_metrics(self.cfg.metrics, self.metrics)
        event(log, "start", area=self.area, metrics_port=self.cfg.metrics.port or None, meters=len(self.registry),
              kid=self.ingest.paillier.kid, heads=len(self.ingest.heads),
              height=self.chain.replica.height if self.chain else None)
        topics = [self.alerts.topic(), self.events.topic(), *(self.chain.subscriptions() if self.chain else [])]

        async def serve(client: aiomqtt.Client) -> None:
            client.pending_calls_threshold = 2 * BATCH_MAX  # a block's votes go out together
            await self._serve(client, stop)

        ingest = asyncio.create_task(self._ingest(stop), name="ingest")
        try:
            session = keep_connected(self.cfg.mqtt, f"gateway-{self.area}", topics, stop, serve, log,
                                     max_inflight_messages=BATCH_MAX)
            await asyncio.gather(session, ingest, *([self.registry_node.run(stop)] if self.registry_node else []))
        finally:
            ingest.cancel()
            await asyncio.gather(ingest, return_exceptions=True)
            self.store.close()
            self.alerts.close()
            self.events.close()
            if self.chain is not None:
                self.chain.close()
            event(log, "stop", **(self.chain.status() if self.chain else {}), batches=self.batches,
                  **{f"link_{k}": v for k, v in self.readings.io().items()}, **self.counters())

    async def _serve(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """Everything but the readings, on the aiomqtt session: chain votes and sync, alerts, events."""
        tasks = {asyncio.create_task(self._read(client), name="read"),
                 asyncio.create_task(self._status(), name="status"),
                 asyncio.create_task(self.alerts.run(client), name="alerts"),
                 asyncio.create_task(self.events.run(client), name="events")}
        if self.chain is not None:
            tasks.add(asyncio.create_task(self.chain.run(client, self.readings), name="chain"))
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait(tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                try:
                    await asyncio.wait_for(asyncio.gather(self.alerts.queue.join(), self.events.queue.join()), 10)
                except TimeoutError:
                    event(log, "drain_timeout", logging.WARNING, alerts_queued=self.alerts.queue.qsize(),
                          events_queued=self.events.queue.qsize())
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise t.exception()
        finally:
            for t in tasks | {stopper}:
                t.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)

    async def _ingest(self, stop: asyncio.Event) -> None:
        """The reading path until `stop`: the link (reconnecting) and the worker; then
        finish what has arrived, so those meters get their acks now."""
        tasks = {asyncio.create_task(self.readings.run(stop), name="links"),
                 asyncio.create_task(self._work(), name="work")}
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait(tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise t.exception()
            self._accepting = False
            try:
                await asyncio.wait_for(self._drained(), 10)
            except TimeoutError:
                event(log, "drain_timeout", logging.WARNING, queued=len(self.inbox))
        finally:
            for t in tasks | {stopper}:
                t.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            await self.readings.close()

    def _on_reading(self, topic: str, payload: bytes) -> None:
        """The link's callback for each reading: queue it, nothing more."""
        inbox = self.inbox
        if not self._accepting:  # stopping: left to the meter's resend
            return
        if len(inbox) >= QUEUE_MAX:
            self.shed += 1
            if self.shed == 1 or self.shed % 1000 == 0:
                event(log, "overload", logging.WARNING, queued=len(inbox), shed=self.shed)
            return
        inbox.append((topic, payload))
        if len(inbox) >= self._wanted:
            self._enough.set()

    async def _drained(self) -> None:
        while self.inbox or self._busy:
            await asyncio.sleep(0.01)

    async def _read(self, client: aiomqtt.Client) -> None:
        chain = self.chain
        async for msg in client.messages:  # every topic but the readings
            if chain is not None and msg.topic.value.startswith(chain.prefix):
                chain.on_message(client, msg)
            elif self.alerts.handles(msg.topic.value):
                await self.alerts.queue.put(msg)
            elif self.events.handles(msg.topic.value):
                await self.events.queue.put(msg)
            else:
                event(log, "unexpected_topic", logging.WARNING, topic=msg.topic.value[:120])

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            chain = self.chain.status() if self.chain else {}
            event(log, "status", queued=len(self.inbox), batches=self.batches, acks_unsent=self.unsent,
                  **{f"link_{k}": v for k, v in self.readings.dropped().items() if v}, **chain,
                  **{k: v for k, v in self.counters().items() if v},
                  **{f"alert_{k}": v for k, v in self.alerts.counters().items() if v},
                  **{f"event_{k}": v for k, v in self.events.counters().items() if v})

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            self._busy = True
            try:
                await self._process(batch)
            finally:
                self._busy = False

    async def _next_batch(self) -> list[tuple[str, bytes]]:
        """Up to BATCH_MAX readings: those queued once it is full, or BATCH_WAIT_S after
        its first. It waits for the callback to signal enough, not for each message:
        a timed wait costs a task and a timer, as much as a tenth of a reading's checks."""
        inbox = self.inbox
        while not inbox:
            self._wanted = 1
            self._enough.clear()
            await self._enough.wait()
        deadline = time.monotonic() + BATCH_WAIT_S
        seen = len(inbox)
        while len(inbox) < BATCH_MAX:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wanted = BATCH_MAX
            self._enough.clear()
            try:
                await asyncio.wait_for(self._enough.wait(), min(left, BATCH_GAP_S))
            except TimeoutError:
                if len(inbox) == seen:
                    break  # nothing came for BATCH_GAP_S: the inflow paused
                seen = len(inbox)
        self._wanted = QUEUE_MAX + 1
        return [inbox.popleft() for _ in range(min(BATCH_MAX, len(inbox)))]

    async def _process(self, batch: list[tuple[str, bytes]]) -> None:
        accepted, evidence, touched = [], [], set()
        rejected: Counter[str] = Counter()
        nacks: list[tuple[str, dict]] = []
        items = [(self._topic_meter(topic), bytes(payload)) for topic, payload in batch]
        for (meter, _), v in zip(items, self.ingest.check_batch(items)):
            if v.kind == "accept":
                accepted.append(v.reading)
                touched.add(meter)
            elif v.kind == "duplicate":
                touched.add(meter)
            else:
                rejected[v.reason] += 1
                if v.evidence:
                    evidence.append((v.reading, v.reason))
                event(log, "rejected", logging.WARNING, meter=meter, seq=v.seq, reason=v.reason, detail=v.detail)
                if METER_ID_RE.match(meter):
                    nacks.append((meter, {"seq": v.seq, "reason": v.reason}))
                if v.reason in ("replayed_seq", "equivocation") and meter in self.ingest.heads:
                    touched.add(meter)  # re-ack: the meter may have missed its ack
        first_rowid = await asyncio.to_thread(self.store.commit, accepted, evidence, rejected)
        self.ingest.committed()
        self.batches += 1
        if self.chain is not None and (accepted or evidence):
            self.chain.committed(first_rowid, accepted)
            self.chain.more.set()
        # One write at QoS 0, not awaited: see the module's docstring.
        heads, area = self.ingest.heads, self.area
        out = [(ack_topic(area, m), b'{"seq": %d}' % heads[m].seq) for m in sorted(touched)]
        out += [(nack_topic(area, m), json.dumps(body).encode()) for m, body in nacks]
        self.unsent += len(out) - self.readings.publish_many(out)
