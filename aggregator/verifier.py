"""The verifier role: `gridledger verifier run --config verifier.toml`.

It follows the area chain's certificates and, for each certified block, takes an
RV snapshot of the heavy and light nodes (CP from their inventory answers, NP from
the round trips of those answers, CRE from `Credibility`, T from what the P chain
placed on them), chooses the nodes (`reliability.place`), queues the placement
record for the P chain, of which it is the proposer, and sends the placement to
the chosen heavy and light nodes on their `store` topics (full nodes take every
block from the gateway anyway). Receipts from `gl/v1/storage/{area}/receipts` are
checked and queued as P-chain records. A chosen node without a receipt is sent
the placement again after `retry_s`, doubling up to `RETRY_MAX_S`.

The queue and the P chain share one SQLite file; a block's proposal and its
records' marks are one transaction, as in the registry role, so after a crash
every queued record is certified exactly once.
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

from certlog import bls
from certlog.app import InvalidBlock
from certlog.block import ChainError, Header
from certlog.net import Topics, decode_block
from certlog.proposer import Proposer
from certlog.validators import load_validator_set, read_secret_key
from gridledger.config import MqttConfig, read_toml, section
from gridledger.errors import ConfigError
from gridledger.logs import event
from gridledger.metrics import MetricsConfig, Snapshot, serve as serve_metrics
from gridledger.mqtt import keep_connected, until_stopped

from .catchup import Requester
from .pchain import pchain_id, pchain_replica
from .pchainapp import placement_tx, receipt_tx
from .receipts import StorageReceipt, verify_receipt
from .reliability import Credibility, Measure, cp_from_report, np_from_rtts, place
from .storagewire import NODE_RE, StorageError, StorageTopics, encode_placement

__all__ = ["VerifierSettings", "VerifierConfig", "Verifier", "load_verifier_config"]

log = logging.getLogger("gridledger.verifier")

RETRY_MAX_S = 60.0
RTT_WINDOW = 5        # inventory round trips kept per node for NP's median
EARLY_MAX = 4096      # receipts held for blocks not yet placed (a full node may beat the certificate here)


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifierSettings:
    name: str
    area: str
    database: Path
    proposer_key: Path             # the P chain's proposer key
    validators: Path               # the P chain's validator set ([proposer] = this key)
    area_validators: Path          # the area chain's validator set: certificates are checked against it
    genesis: Path                  # pchain-genesis.toml
    chain: str = ""                # default P-{area}
    probe_s: float = 2.0           # inventory probes (CP and NP)
    np_ref_ms: float = 50.0        # a round trip this fast or faster is NP = 1
    cre_start: int = 1000          # CRE of a node nothing is known of yet (per mille)
    retry_s: float = 5.0           # a placement without a receipt is sent again after this
    timeout_s: float = 2.0         # an inventory probe's time-out
    block_max: int = 500
    block_wait_s: float = 0.2
    resend_s: float = 2.0


@dataclass(frozen=True, slots=True)
class VerifierConfig:
    verifier: VerifierSettings
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load_verifier_config(path: Path) -> VerifierConfig:
    path = Path(path)
    doc = read_toml(path)
    s = section(VerifierSettings, doc, "verifier", path.parent,
                ("database", "proposer_key", "validators", "area_validators", "genesis"))
    if not NODE_RE.match(s.name):
        raise ConfigError("[verifier] name must match [A-Za-z0-9_-]{1,64}")
    if min(s.probe_s, s.np_ref_ms, s.retry_s, s.timeout_s) <= 0 or not 0 <= s.cre_start <= 1000:
        raise ConfigError("[verifier] probe_s, np_ref_ms, retry_s, timeout_s must be positive, cre_start 0..1000")
    pchain_id(s.area, s.chain)
    return VerifierConfig(s, section(MqttConfig, doc, "mqtt"), section(MetricsConfig, doc, "metrics"))


class Verifier:
    def __init__(self, cfg: VerifierConfig):
        self.cfg = cfg
        s = self.settings = cfg.verifier
        self.area_validators = load_validator_set(s.area_validators)
        self.replica = pchain_replica(pchain_id(s.area, s.chain), s.genesis, s.validators, s.database,
                                      self.area_validators)
        self.genesis = self.replica.app.genesis
        if self.genesis.area != s.area:
            raise ConfigError(f"{s.genesis} is the P-chain genesis of {self.genesis.area}, not {s.area}")
        self._sk = read_secret_key(s.proposer_key)
        vset = self.replica.validators
        if vset.proposer is None or vset.proposer.public_key != bls.SkToPk(self._sk):
            raise ConfigError(f"{s.proposer_key} is not the proposer key in {s.validators}")
        self.conn = self.replica.store.conn
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS p_queue (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tx BLOB NOT NULL,
                status TEXT NOT NULL, height INTEGER);
            CREATE TABLE IF NOT EXISTS p_placed (
                height INTEGER PRIMARY KEY, hash TEXT NOT NULL, nodes TEXT NOT NULL, receipted TEXT NOT NULL,
                sent_at REAL NOT NULL, tries INTEGER NOT NULL, complete INTEGER NOT NULL);""")
        self.area_topics, self.topics = Topics(s.area), StorageTopics(s.area)
        self.p_topics = Topics(self.replica.chain)
        self.cre = Credibility(s.cre_start)  # the audit slice adjusts it
        self.rtts: dict[str, deque] = {n.name: deque(maxlen=RTT_WINDOW) for n in self.genesis.nodes}
        self.cp: dict[str, int] = {}
        self.load: Counter[str] = Counter()
        for (nodes,) in self.conn.execute("SELECT nodes FROM p_placed"):
            self.load.update(json.loads(nodes))
        self.early: dict[int, list[StorageReceipt]] = {}
        self.counts: Counter[str] = Counter()
        self.more = asyncio.Event()
        self.proposer: Proposer | None = None
        self._db = asyncio.Lock()
        self._client: aiomqtt.Client | None = None
        self.requester = Requester(self._publish_qos0, s.name, self.topics, timeout_s=s.timeout_s, window=2,
                                   retries=0)

    # -- RV ---------------------------------------------------------------------------
    def snapshot(self) -> list[Measure]:
        """The heavy and light nodes' terms now, by name."""
        s = self.settings
        return [Measure(n, self.cp.get(n, 1000), np_from_rtts(list(self.rtts[n]), s.np_ref_ms), self.cre[n],
                        self.load[n]) for n in self.genesis.candidates]

    async def _probe(self, node: str) -> None:
        t0 = time.monotonic()
        try:
            meta, _ = await self.requester.ask(node, "inventory")
        except StorageError:
            self.rtts[node].append(None)
            return
        self.rtts[node].append((time.monotonic() - t0) * 1000)
        used, cap = meta.get("used"), meta.get("capacity")
        if type(used) is int and type(cap) is int and cap >= 0 and used >= 0:
            self.cp[node] = cp_from_report(cap - used, cap)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(n) for n in self.genesis.candidates))
            await asyncio.sleep(self.settings.probe_s)

    # -- area certificates -> placements -------------------------------------------------
    async def on_cert(self, payload: bytes) -> None:
        msg = decode_block(payload)
        header, cert = msg.header, msg.cert
        if header.chain != self.settings.area or cert is None:
            raise ChainError("wrong_chain", header.chain)
        self.area_validators.check_certificate(cert, header)
        async with self._db:
            if self.conn.execute("SELECT 1 FROM p_placed WHERE height = ?", (header.height,)).fetchone():
                return
            snap = self.snapshot()
            nodes = place(header.hash, self.genesis.full, snap, self.genesis.replicas)
            with self.replica.store.transaction():
                self.conn.execute("INSERT INTO p_queue(id, tx, status, height) VALUES (?, ?, 'queued', NULL)",
                                  (f"placement/{header.height}", placement_tx(cert, nodes, snap)))
                self.conn.execute("INSERT INTO p_placed VALUES (?, ?, ?, '[]', ?, 0, 0)",
                                  (header.height, header.hash, json.dumps(nodes), time.time()))
            self.load.update(nodes)
        self.more.set()
        self.counts["placed"] += 1
        event(log, "placed", height=header.height, nodes=list(nodes),
              rv={m.node: round(m.cp * m.np * m.cre / 1e9 / (m.t + 1) ** 0.5, 4) for m in snap})
        await self._send(header.height, [n for n in nodes if n not in self.genesis.full])
        for r in self.early.pop(header.height, []):
            await self._take_receipt(r)

    async def _send(self, height: int, nodes: list[str]) -> None:
        if self._client is None:
            return
        for n in nodes:
            await self._client.publish(self.topics.store(n), encode_placement(heights=[height], by=self.settings.name),
                                       qos=1)

    # -- receipts ------------------------------------------------------------------------
    async def on_receipt(self, payload: bytes) -> None:
        try:
            r = StorageReceipt.from_dict(json.loads(payload))
        except (ValueError, UnicodeDecodeError):
            raise ChainError("receipt_schema", "not JSON") from None
        node = self.genesis.node(r.node)
        if r.chain != self.settings.area or node is None or node.kind != r.kind:
            raise ChainError("receipt_unknown_node", f"{r.node} ({r.kind}) of {r.chain}")
        if not await asyncio.to_thread(verify_receipt, r, node.public_key):
            raise ChainError("receipt_signature", f"not signed by {r.node}", height=r.height)
        await self._take_receipt(r)

    async def _take_receipt(self, r: StorageReceipt) -> None:
        async with self._db:
            row = self.conn.execute("SELECT hash, nodes, receipted FROM p_placed WHERE height = ?",
                                    (r.height,)).fetchone()
            if row is None:
                if len(self.early) < EARLY_MAX:
                    self.early.setdefault(r.height, []).append(r)
                self.counts["receipt_early"] += 1
                return
            nodes, got = json.loads(row[1]), json.loads(row[2])
            if row[0] != r.hash or r.node not in nodes:
                self.counts["receipt_not_placed"] += 1
                return
            if r.node in got:
                self.counts["receipt_duplicate"] += 1
                return
            with self.replica.store.transaction():
                self.conn.execute("INSERT INTO p_queue(id, tx, status, height) VALUES (?, ?, 'queued', NULL)",
                                  (f"receipt/{r.height}/{r.node}", receipt_tx(r)))
                self.conn.execute("UPDATE p_placed SET receipted = ?, complete = ? WHERE height = ?",
                                  (json.dumps(sorted(got + [r.node])), len(got) + 1 == len(nodes), r.height))
        self.counts["receipts"] += 1
        self.more.set()

    # -- retries -------------------------------------------------------------------------
    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.retry_s / 2))
            now = time.time()
            async with self._db:
                rows = self.conn.execute("SELECT height, nodes, receipted, sent_at, tries FROM p_placed "
                                         "WHERE complete = 0").fetchall()
                due = []
                for h, nodes, got, sent, tries in rows:
                    lacking = [n for n in json.loads(nodes) if n not in json.loads(got)]
                    if lacking and now - sent >= min(self.settings.retry_s * 2 ** tries, RETRY_MAX_S):
                        due.append((h, lacking))
                        self.conn.execute("UPDATE p_placed SET sent_at = ?, tries = tries + 1 WHERE height = ?",
                                          (now, h))
            for h, lacking in due:
                self.counts["placements_resent"] += 1
                event(log, "placement_resent", height=h, nodes=lacking)
                await self._send(h, lacking)

    # -- the P chain ---------------------------------------------------------------------
    async def _propose(self, client: aiomqtt.Client) -> None:
        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1)

        s = self.settings
        self.proposer = Proposer(self.replica, publish, self._sk, resend_s=s.resend_s, commit_lock=self._db)
        await self._certified()

        async def certified(header: Header) -> None:
            event(log, "certified", logging.DEBUG, chain=header.chain, height=header.height, txs=header.txs,
                  stored=header.app.get("stored"))
            await self._certified()

        await self.proposer.run(self._prepare, self.more, block_max=s.block_max, block_wait_s=s.block_wait_s,
                                certified=certified)

    def _prepare(self) -> tuple[Header, list[bytes]] | None:
        while True:
            rows = self.conn.execute("SELECT seq, tx FROM p_queue WHERE status = 'queued' ORDER BY seq LIMIT ?",
                                     (self.settings.block_max,)).fetchall()
            if not rows:
                return None
            seqs, txs = [r[0] for r in rows], [r[1] for r in rows]

            def mark(header: Header) -> None:
                self.conn.executemany("UPDATE p_queue SET status = 'proposed', height = ? WHERE seq = ?",
                                      [(header.height, q) for q in seqs])

            try:
                return self.proposer.prepare(txs, mark), txs
            except InvalidBlock as exc:  # checked on arrival; a refusal here is a bug: drop the record, go on
                if exc.index is None:
                    raise
                with self.replica.store.transaction():
                    self.conn.execute("UPDATE p_queue SET status = 'refused' WHERE seq = ?", (seqs[exc.index],))
                self.counts["refused_" + exc.reason] += 1
                event(log, "record_refused", logging.ERROR, reason=exc.reason, detail=exc.detail)

    async def _certified(self) -> None:
        async with self._db:
            with self.replica.store.transaction():
                self.conn.execute("UPDATE p_queue SET status = 'certified' WHERE status = 'proposed' AND height <= ?",
                                  (self.replica.height,))

    # -- the process ----------------------------------------------------------------------
    def metrics(self) -> list[Snapshot]:
        rows = self.conn.execute("SELECT status, COUNT(*) FROM p_queue GROUP BY status").fetchall()
        return [Snapshot("gridledger_pchain_height", "last certified P-chain height", "gauge", (),
                         {(): self.replica.height}),
                Snapshot("gridledger_pchain_records", "P-chain records, by status", "gauge", ("status",),
                         {(s,): n for s, n in rows}),
                Snapshot("gridledger_verifier_events", "placements, receipts, retries, refusals", "counter",
                         ("event",), {(k,): v for k, v in self.counts.items()})]

    async def _publish_qos0(self, topic: str, payload: bytes) -> None:
        if self._client is None:
            raise StorageError("peer_timeout", "not connected")
        await self._client.publish(topic, payload, qos=0)

    async def run(self, stop: asyncio.Event) -> None:
        serve_metrics(self.cfg.metrics, self.metrics)
        s = self.settings
        event(log, "start", area=s.area, chain=self.replica.chain, height=self.replica.height,
              nodes=[n.name for n in self.genesis.nodes], replicas=self.genesis.replicas)
        topics = [self.area_topics.certs, self.topics.receipts, self.topics.responses(s.name), self.p_topics.votes,
                  self.p_topics.sync]

        async def serve(client: aiomqtt.Client) -> None:
            self._client = client
            try:
                await until_stopped(stop, self._read(client), self._propose(client), self._probe_loop(),
                                    self._retry_loop())
            finally:
                self._client = None

        try:
            await keep_connected(self.cfg.mqtt, f"verifier-{s.area}-{s.name}", topics, stop, serve, log)
        finally:
            self.conn.close()
            event(log, "stop", height=self.replica.height, **self.counts)

    async def _read(self, client: aiomqtt.Client) -> None:
        resp = self.topics.responses(self.settings.name)
        async for msg in client.messages:
            payload = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
            topic = msg.topic.value
            try:
                if topic == resp:
                    self.requester.on_response(payload)
                elif topic == self.area_topics.certs:
                    await self.on_cert(payload)
                elif topic == self.topics.receipts:
                    await self.on_receipt(payload)
                elif self.proposer is None:
                    continue
                elif topic == self.p_topics.votes:
                    self.proposer.on_vote(payload)
                else:
                    async with self._db:
                        await self.proposer.on_sync(payload)
            except ChainError as exc:
                self.counts[exc.reason] += 1
                event(log, "refused", logging.WARNING, topic=topic.rsplit("/", 1)[-1], reason=exc.reason,
                      detail=exc.detail[:200], height=exc.height)
