"""The gateway role: MQTT ingest -> checks -> SQLite -> ack.

One task reads MQTT messages into a queue; one worker drains it in batches,
checks each reading, writes the batch in one durable transaction, and only then
publishes the acks. A bad message is counted, logged and answered with a nack;
it never stops the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from gridledger.config import MqttConfig, mqtt_section, read_toml, section
from gridledger.errors import ConfigError
from gridledger.logs import event
from gridledger.mqtt import keep_connected
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

# Batching trades latency for fsyncs: one fsync per batch. 20 ms keeps the ack
# latency far below a meter's resend timer while a busy area still gets big batches.
BATCH_MAX = 512
BATCH_WAIT_S = 0.02
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
        self.queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue(QUEUE_MAX)
        # Set by the reader once the queue holds what the batch being gathered still needs.
        self._enough = asyncio.Event()
        self._wanted = QUEUE_MAX + 1
        self.batches = 0
        self._prefix = f"gl/v1/{self.area}/meters/"
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
        return out

    def metrics(self) -> list[Snapshot]:
        counts = self.counters()
        out = [
            Snapshot("gridledger_ingest_readings", "readings by verdict (accept, duplicate) or rejection reason",
                     "counter", ("result",), {(k,): v for k, v in counts.items()}),
            Snapshot("gridledger_ingest_rejections_by_class", "rejections by the issue's reason classes",
                     "counter", ("class",), {(k,): v for k, v in class_counts(counts).items()}),
            Snapshot("gridledger_ingest_queue", "messages waiting for the checker", "gauge", (),
                     {(): self.queue.qsize()}),
            Snapshot("gridledger_ingest_batches", "durable ingest transactions", "counter", (), {(): self.batches}),
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
        topics = [f"{self._prefix}+/readings", self.alerts.topic(), self.events.topic(),
                  *(self.chain.subscriptions() if self.chain else [])]

        async def serve(client: aiomqtt.Client) -> None:
            client.pending_calls_threshold = 2 * BATCH_MAX  # a batch's acks go out together
            await self._serve(client, stop)

        try:
            session = keep_connected(self.cfg.mqtt, f"gateway-{self.area}", topics, stop, serve, log,
                                     max_inflight_messages=BATCH_MAX)
            if self.registry_node is None:
                await session
            else:
                await asyncio.gather(session, self.registry_node.run(stop))
        finally:
            self.store.close()
            self.alerts.close()
            self.events.close()
            if self.chain is not None:
                self.chain.close()
            event(log, "stop", **(self.chain.status() if self.chain else {}), **self.counters())

    async def _serve(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        tasks = {asyncio.create_task(self._read(client), name="read"),
                 asyncio.create_task(self._work(client), name="work"),
                 asyncio.create_task(self._status(), name="status"),
                 asyncio.create_task(self.alerts.run(client), name="alerts"),
                 asyncio.create_task(self.events.run(client), name="events")}
        if self.chain is not None:
            tasks.add(asyncio.create_task(self.chain.run(client), name="chain"))
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait(tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                # Finish what has arrived so those meters get their acks now.
                for t in tasks:
                    if t.get_name() == "read":
                        t.cancel()
                try:
                    await asyncio.wait_for(asyncio.gather(self.queue.join(), self.alerts.queue.join(),
                                                          self.events.queue.join()), 10)
                except TimeoutError:
                    event(log, "drain_timeout", logging.WARNING, queued=self.queue.qsize(),
                          alerts_queued=self.alerts.queue.qsize())
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise t.exception()
        finally:
            for t in tasks | {stopper}:
                t.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)

    async def _read(self, client: aiomqtt.Client) -> None:
        chain = self.chain
        async for msg in client.messages:
            if chain is not None and msg.topic.value.startswith(chain.prefix):
                chain.on_message(client, msg)
            elif self.alerts.handles(msg.topic.value):
                await self.alerts.queue.put(msg)
            elif self.events.handles(msg.topic.value):
                await self.events.queue.put(msg)
            else:
                await self.queue.put(msg)
                if self.queue.qsize() >= self._wanted:
                    self._enough.set()

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            chain = self.chain.status() if self.chain else {}
            event(log, "status", queued=self.queue.qsize(), batches=self.batches, **chain,
                  **{k: v for k, v in self.counters().items() if v},
                  **{f"alert_{k}": v for k, v in self.alerts.counters().items() if v},
                  **{f"event_{k}": v for k, v in self.events.counters().items() if v})

    async def _work(self, client: aiomqtt.Client) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._process(client, batch)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _next_batch(self) -> list[aiomqtt.Message]:
        """Up to BATCH_MAX messages: those queued once it is full, or BATCH_WAIT_S after
        its first. It waits for the reader to signal enough, not for each message:
        a timed wait costs a task and a timer, as much as a tenth of a reading's checks."""
        batch = [await self.queue.get()]
        deadline = time.monotonic() + BATCH_WAIT_S
        while True:
            while len(batch) < BATCH_MAX and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            left = deadline - time.monotonic()
            if len(batch) >= BATCH_MAX or left <= 0:
                return batch
            self._wanted = BATCH_MAX - len(batch)
            self._enough.clear()
            try:
                await asyncio.wait_for(self._enough.wait(), left)
            except TimeoutError:
                pass
            finally:
                self._wanted = QUEUE_MAX + 1

    async def _process(self, client: aiomqtt.Client, batch: list[aiomqtt.Message]) -> None:
        accepted, evidence, touched = [], [], set()
        rejected: Counter[str] = Counter()
        nacks: list[tuple[str, dict]] = []
        for msg in batch:
            meter = self._topic_meter(msg.topic.value)
            payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else str(msg.payload).encode()
            v = self.ingest.check(meter, bytes(payload))
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
        await asyncio.to_thread(self.store.commit, accepted, evidence, rejected)
        self.ingest.committed()
        self.batches += 1
        if self.chain is not None and (accepted or evidence):
            self.chain.more.set()
        # All at once: awaited one by one, each QoS 1 publish costs a broker round
        # trip, and a batch touching hundreds of meters would hold the next batch up.
        await asyncio.gather(
            *(client.publish(ack_topic(self.area, m), json.dumps({"seq": self.ingest.heads[m].seq}), qos=1)
              for m in sorted(touched)),
            *(client.publish(nack_topic(self.area, m), json.dumps(body), qos=1) for m, body in nacks))
