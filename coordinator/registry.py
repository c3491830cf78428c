"""The registry role: proposer of the registry chain, `gridledger registry run`.

Signed records (enrollments, nodes, retirements) arrive on

    gl/v1/chains/{chain}/submit              the record's bytes

and each gets its fate, retained, on

    gl/v1/chains/{chain}/results/{record id} {"id", "status", "reason"?, "height"?}

with status `queued` (durable here, checked against the current state plus
everything queued before it), `refused` (with the app's reason), then
`certified` (with the height) once 2f+1 validators signed its block. A record
is checked in full on arrival, so a refusal comes back at once; submitting the
same bytes again is answered with their current status, never queued twice.
The queue and the chain share one SQLite database, and a block's proposal and
its records' `proposed` marks are one transaction, so after a crash every
queued record ends up in the chain exactly once.

`RegistryChainSettings` is how the other roles (gateway, validators) find the
chain they follow: its id, validator set, genesis file and their local replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from certlog import bls
from certlog.app import InvalidBlock
from certlog.block import Header, canonical
from certlog.follower import Follower
from certlog.proposer import Proposer
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.validators import load_validator_set, read_secret_key
from certlog.voter import ValidatorNode, Voter
from gridledger.config import MqttConfig, mqtt_section, read_toml, section
from gridledger.errors import ConfigError
from gridledger.logs import event
from gridledger.metrics import MetricsConfig, Snapshot, serve as serve_metrics
from gridledger.mqtt import auth_options, keep_connected, until_stopped
from gridledger.wire import METER_ID_RE

from .registryapp import RegistryApp, RegistryHistory, load_genesis, record_id

__all__ = ["RegistryChainSettings", "RegistrySettings", "RegistryConfig", "RegistryRole", "load_registry_config",
           "registry_replica", "registry_node", "submit", "MAX_RECORD"]

log = logging.getLogger("gridledger.registry")

MAX_RECORD = 32768  # a threshold key record with its verification keys is ~6 kB


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryChainSettings:
    """`[registry_chain]` of a gateway or validator config: the registry chain it reads."""
    validators: Path
    genesis: Path
    database: Path          # this role's replica of the registry chain (its own file)
    chain: str = "registry"

    @classmethod
    def from_doc(cls, doc: dict, base: Path) -> "RegistryChainSettings | None":
        if "registry_chain" not in doc:
            return None
        s = section(cls, doc, "registry_chain", base, ("validators", "genesis", "database"))
        if not METER_ID_RE.match(s.chain):
            raise ConfigError(f"registry chain id {s.chain!r} must match [A-Za-z0-9_-]{{1,32}}")
        return s


def registry_replica(s: RegistryChainSettings | "RegistrySettings") -> tuple[Replica, RegistryHistory]:
    """The local replica of the registry chain and its read side, kept in step."""
    replica = Replica(s.chain, RegistryApp(load_genesis(s.genesis)), ChainStore(connect(s.database)),
                      load_validator_set(s.validators))
    history = RegistryHistory.from_store(replica.store, s.chain)
    replica.listeners.append(history.apply)
    return replica, history


def registry_node(s: RegistryChainSettings, mqtt: MqttConfig, name: str, secret_key: Path | None = None):
    """A validator of the registry chain if `name` is in its set (and has a key), else a follower."""
    replica, history = registry_replica(s)
    if mqtt.client_id:  # its own MQTT session beside the role's main one
        mqtt = dataclasses.replace(mqtt, client_id=f"{mqtt.client_id}-{s.chain}")
    if secret_key is not None and any(m.name == name for m in replica.validators.members):
        node = ValidatorNode(Voter(replica, replica.validators.index(name), read_secret_key(secret_key)), mqtt,
                             name=name)
    else:
        node = Follower(replica, mqtt, name=name)
    return node, history


# -- the proposer role ---------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrySettings:
    database: Path
    validators: Path
    genesis: Path
    proposer_key: Path
    chain: str = "registry"
    block_max: int = 500
    block_wait_s: float = 0.2
    resend_s: float = 2.0


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    registry: RegistrySettings
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load_registry_config(path: Path) -> RegistryConfig:
    path = Path(path)
    doc = read_toml(path)
    s = section(RegistrySettings, doc, "registry", path.parent, ("database", "validators", "genesis", "proposer_key"))
    if not METER_ID_RE.match(s.chain):
        raise ConfigError(f"registry chain id {s.chain!r} must match [A-Za-z0-9_-]{{1,32}}")
    return RegistryConfig(s, mqtt_section(doc, path), section(MetricsConfig, doc, "metrics"))


class RegistryRole:
    def __init__(self, cfg: RegistryConfig):
        self.cfg = cfg
        s = cfg.registry
        self.replica, self.history = registry_replica(s)
        self.conn = self.replica.store.conn
        self.conn.execute("""CREATE TABLE IF NOT EXISTS registry_queue (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tx BLOB NOT NULL,
            status TEXT NOT NULL, reason TEXT, height INTEGER, at REAL NOT NULL)""")
        self._sk = read_secret_key(s.proposer_key)
        vset = self.replica.validators
        if vset.proposer is None or vset.proposer.public_key != bls.SkToPk(self._sk):
            raise ConfigError(f"{s.proposer_key} is not the proposer key in {s.validators}")
        self.base = f"gl/v1/chains/{s.chain}/"
        self.proposer: Proposer | None = None
        self.more = asyncio.Event()
        self.counts: Counter[str] = Counter()
        self._db = asyncio.Lock()

    def metrics(self) -> list[Snapshot]:
        rows = self.conn.execute("SELECT status, COUNT(*) FROM registry_queue GROUP BY status").fetchall()
        return [Snapshot("gridledger_registry_height", "last certified registry height", "gauge", (),
                         {(): self.replica.height}),
                Snapshot("gridledger_registry_records", "records held, by status", "gauge", ("status",),
                         {(s,): n for s, n in rows}),
                Snapshot("gridledger_registry_submissions", "submissions by outcome (refusals by reason)", "counter",
                         ("result",), {(k,): v for k, v in self.counts.items()})]

    async def run(self, stop: asyncio.Event) -> None:
        serve_metrics(self.cfg.metrics, self.metrics)
        event(log, "start", chain=self.replica.chain, height=self.replica.height)
        topics = [self.base + "submit", self.base + "votes", self.base + "sync"]

        async def serve(client: aiomqtt.Client) -> None:
            await until_stopped(stop, self._read(client), self._propose(client))

        try:
            await keep_connected(self.cfg.mqtt, f"registry-{self.replica.chain}", topics, stop, serve, log)
        finally:
            self.conn.close()
            event(log, "stop", height=self.replica.height, **self.counts)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            payload = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
            topic = msg.topic.value
            if topic.endswith("/submit"):
                await self._submit(client, payload)
            elif self.proposer is None:
                continue
            elif topic.endswith("/votes"):
                self.proposer.on_vote(payload)
            else:
                async with self._db:
                    await self.proposer.on_sync(payload)

    # -- submissions ------------------------------------------------------------
    async def _submit(self, client: aiomqtt.Client, tx: bytes) -> None:
        rid = record_id(tx)
        async with self._db:
            known = self.conn.execute("SELECT status, reason, height FROM registry_queue WHERE id = ?",
                                      (rid,)).fetchone()
            if known is not None:
                result = self._result(rid, *known)
            elif len(tx) > MAX_RECORD:
                result = self._result(rid, "refused", "tx_too_large", None)
            else:
                result = await asyncio.to_thread(self._admit, rid, tx)
        self.counts[result["status"] if result["status"] != "refused" else "refused_" + result["reason"]] += 1
        event(log, "submission", id=rid[:16], **{k: v for k, v in result.items() if k != "id"})
        await self._publish_result(client, result)

    def _admit(self, rid: str, tx: bytes) -> dict:
        """Check `tx` after the state and everything queued; queue it durably if it holds."""
        ahead = [r[0] for r in self.conn.execute("SELECT tx FROM registry_queue WHERE status = 'queued' ORDER BY seq")]
        pending = self.replica.store.proposal()  # a block in flight: its state is where the queue starts
        root = pending[0].state_root if pending else self.replica.state_root
        try:
            self.replica.app.execute(self.replica.store.nodes, root, int(time.time() * 1000), ahead + [tx])
        except InvalidBlock as exc:
            if exc.index is not None and exc.index < len(ahead):
                raise  # what is queued no longer holds: a bug, not this record's fault
            return self._result(rid, "refused", exc.reason, None, exc.detail)
        with self.replica.store.transaction():
            self.conn.execute("INSERT INTO registry_queue(id, tx, status, at) VALUES (?, ?, 'queued', ?)",
                              (rid, tx, time.time()))
        self.more.set()
        return self._result(rid, "queued", None, None)

    @staticmethod
    def _result(rid: str, status: str, reason: str | None, height: int | None, detail: str = "") -> dict:
        out: dict = {"id": rid, "status": status}
        if reason:
            out["reason"] = reason
        if detail:
            out["detail"] = detail
        if height:
            out["height"] = height
        return out

    async def _publish_result(self, client: aiomqtt.Client, result: dict) -> None:
        await client.publish(f"{self.base}results/{result['id']}", canonical(result), qos=1, retain=True)

    # -- blocks -------------------------------------------------------------------
    async def _propose(self, client: aiomqtt.Client) -> None:
        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1)

        s = self.cfg.registry
        self.proposer = Proposer(self.replica, publish, self._sk, resend_s=s.resend_s, commit_lock=self._db)
        await self._certified(client)  # records whose block was certified just before a crash

        async def certified(header: Header) -> None:
            event(log, "certified", height=header.height, txs=header.txs)
            await self._certified(client)

        await self.proposer.run(self._prepare, self.more, block_max=s.block_max, block_wait_s=s.block_wait_s,
                                certified=certified)

    def _prepare(self) -> tuple[Header, list[bytes]] | None:
        return self.proposer.prepare_queued("registry_queue", self.cfg.registry.block_max, self.counts)

    async def _certified(self, client: aiomqtt.Client) -> None:
        """Mark what the chain now holds as certified and tell the submitters."""
        async with self._db:
            rows = self.proposer.certify_queued("registry_queue")
        for rid, height in rows:
            self.counts["certified"] += 1
            await self._publish_result(client, self._result(rid, "certified", None, height))


async def submit(mqtt: MqttConfig, txs: list[bytes], *, chain: str = "registry",
                 timeout_s: float = 30.0) -> list[dict]:
    """Submit signed records and wait for each one's fate, `certified` or `refused`
    (the published results, in order); `TimeoutError` if the registry role does not
    answer them all in time."""
    ids = [record_id(tx) for tx in txs]
    results: dict[str, dict] = {}
    base = f"gl/v1/chains/{chain}/"
    async with aiomqtt.Client(mqtt.host, mqtt.port, **auth_options(mqtt)) as client:
        for rid in dict.fromkeys(ids):
            await client.subscribe(f"{base}results/{rid}", qos=1)
        for tx in txs:
            await client.publish(base + "submit", tx, qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                async for msg in client.messages:
                    try:
                        result = json.loads(bytes(msg.payload))
                    except (TypeError, ValueError):
                        continue
                    if isinstance(result, dict) and result.get("status") in ("certified", "refused"):
                        results[result.get("id")] = result
                    if all(rid in results for rid in ids):
                        break
        except TimeoutError:
            raise TimeoutError(f"{len(set(ids) - set(results))} of {len(ids)} records unanswered") from None
    return [results[rid] for rid in ids]
