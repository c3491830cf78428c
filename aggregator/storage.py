"""The storage node role: `gridledger storage run --config storage.toml`.

A full node keeps every certified block of its chain; heavy and light nodes keep
every certified header and the bodies placed on them. Headers come from the
chain's certificates topic, bodies from the proposer's sync service (full nodes)
and from peers (`catchup`); each is admitted only against the validator set and
its certified header, and once a body is durable the node publishes a signed
storage receipt. It answers peers' requests (`storageserve`) over MQTT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from certlog import bls
from certlog.block import Certificate, ChainError, Header, canonical
from certlog.net import SYNC_BATCH, Topics, decode_block
from certlog.validators import load_validator_set, read_secret_key
from gridledger.config import MqttConfig, mqtt_section, read_toml, section
from gridledger.errors import ConfigError
from gridledger.logs import event
from gridledger.mqtt import keep_connected, until_stopped
from gridledger.mqttlink import LinkSession

from .admission import AdmittedBody, admit_body, admit_header
from .catchup import CatchUp, Requester
from .receipts import BATCH_MAX, sign_receipts
from .sampler import Sampler, Stages
from .storageserve import StorageServer, error_response
from .storagestore import StorageStore
from .storagewire import (CHUNK_MAX, CHUNK_MIN, KINDS, NODE_RE, StorageError, StorageTopics, liveness,
                          parse_liveness, parse_placement, parse_request)

__all__ = ["StorageSettings", "StorageConfig", "StorageNode", "load_storage_config"]

log = logging.getLogger("gridledger.storage")

SYNC_RETRY_S = 1.0
STATUS_EVERY_S = 10.0
SERVING_MAX = 16   # requests answered at once; beyond that a peer is told "busy" and retries
# A directory: a promoted node samples where its threads spend the fill and writes
# {dir}/{name}.json when filled (bench/recovery.py's per-MB costs).
FILL_PROFILE_ENV = "GRIDLEDGER_FILL_PROFILE"


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageSettings:
    name: str
    kind: str                      # full | heavy | light
    chain: str
    database: Path
    secret_key: Path               # BLS key that signs receipts and audit answers
    validators: Path               # the chain's validator set
    peers: list[str] = field(default_factory=list)   # other storage nodes of the chain
    proposer_sync: bool = True     # full nodes (promoted ones too): fetch new blocks from the proposer
    catchup_s: float = 5.0         # seconds between catch-up rounds (inventories of peers)
    chunk_size: int = CHUNK_MAX
    window: int = 4                # outstanding requests per peer
    timeout_s: float = 3.0         # per request, before a retry
    capacity_bytes: int = 0        # offered for bodies, reported in inventories (RV's CP); 0: not limited


@dataclass(frozen=True, slots=True)
class StorageConfig:
    storage: StorageSettings
    mqtt: MqttConfig = field(default_factory=MqttConfig)


def load_storage_config(path: Path) -> StorageConfig:
    path = Path(path)
    doc = read_toml(path)
    s = section(StorageSettings, doc, "storage", path.parent, ("database", "secret_key", "validators"))
    if s.kind not in KINDS:
        raise ConfigError(f"[storage] kind must be one of {', '.join(KINDS)}, not {s.kind!r}")
    if not NODE_RE.match(s.name) or not all(isinstance(p, str) and NODE_RE.match(p) for p in s.peers):
        raise ConfigError("[storage] name and peers must match [A-Za-z0-9_-]{1,64}")
    if s.name in s.peers:
        raise ConfigError("[storage] peers must not include the node itself")
    if not CHUNK_MIN <= s.chunk_size <= CHUNK_MAX or not 1 <= s.window <= 64:
        raise ConfigError(f"[storage] chunk_size must be {CHUNK_MIN}..{CHUNK_MAX}, window 1..64")
    if s.catchup_s <= 0 or s.timeout_s <= 0 or type(s.capacity_bytes) is not int or s.capacity_bytes < 0:
        raise ConfigError("[storage] catchup_s and timeout_s must be positive, capacity_bytes >= 0")
    return StorageConfig(s, mqtt_section(doc, path))


class StorageNode:
    def __init__(self, cfg: StorageConfig):
        s = self.settings = cfg.storage
        self.mqtt = cfg.mqtt
        self.name, self.chain = s.name, s.chain
        self.validators = load_validator_set(s.validators)
        self._sk = read_secret_key(s.secret_key)
        self.public_key = bls.SkToPk(self._sk)
        self.store = StorageStore(s.database)
        # The verifier's last word on our kind (a promotion) outranks the config file.
        self.kind = self.store.kind() or s.kind
        # Serving reads through a connection of its own: WAL lets them run beside the
        # fill's writes instead of queueing behind them on one connection.
        self.server = StorageServer(StorageStore(s.database, writer=False), node=s.name, kind=self.kind,
                                    secret_key=self._sk, capacity=s.capacity_bytes)
        # and so do catch-up's reads (what is wanted, lacking, held), which would otherwise
        # wait behind every commit (an fsync) of the fill they plan.
        self.reads = StorageStore(s.database, writer=False)
        self.chain_topics = Topics(s.chain)
        self.topics = StorageTopics(s.chain)
        self.sync_name = f"storage-{s.name}"   # our name at the proposer's sync service
        self.counts: Counter[str] = Counter()
        self._db = asyncio.Lock()              # one user of the store's connection at a time
        self._serve_db = asyncio.Lock()        # and of the server's
        self._read_db = asyncio.Lock()         # and of the reads'.
        self._commit_lock = asyncio.Lock()     # one group commit at a time (keep_bodies)
        self._to_commit: list = []             # (bodies, source, future) waiting for the next one
        self._client: aiomqtt.Client | None = None
        self._inbox: LinkSession | None = None   # the responses' link (`run`)
        self.stages = Stages()                 # seconds per stage of the hot paths (the fill's figures)
        self.requester = Requester(self._publish_qos0, s.name, self.topics, timeout_s=s.timeout_s, window=s.window,
                                   stages=self.stages)
        self.catchup = CatchUp(self, self.requester, s.peers, chunk_size=s.chunk_size, inventory_s=s.catchup_s)
        self._serving = 0
        self._wake = asyncio.Event()
        self._last_sync = 0.0
        self._sync_end = 0
        self._filling: dict | None = None      # since a promotion: {"t0", "bytes", "bodies"} until every body is held

    # -- the store, one user at a time, off the event loop -------------------------------
    async def _db_call(self, fn, *args, lock: asyncio.Lock | None = None):
        async with lock or self._db:
            return await asyncio.to_thread(fn, *args)

    async def _read(self, fn, *args):
        return await self._db_call(fn, *args, lock=self._read_db)

    async def header(self, height: int) -> tuple[Header, Certificate] | None:
        return await self._read(self.reads.header, height)

    async def missing_headers(self, upto: int) -> list[int]:
        return await self._read(self.reads.missing_headers, upto)

    async def wanted(self) -> list[int]:
        return await self._read(self.reads.wanted, self.kind)

    async def has_body(self, height: int) -> bool:
        return await self._read(self.reads.has_body, height)

    async def lacking(self, heights: list[int]) -> dict[int, Header]:
        """The certified headers of those `heights` whose bodies are not held."""
        return await self._read(self._lacking_bodies, heights)

    def _lacking_bodies(self, heights: list[int]) -> dict[int, Header]:
        return {h: held[0] for h in heights if not self.reads.has_body(h) and (held := self.reads.header(h))}

    # -- admission: what every path (certs, proposer, peers, placements) goes through -----
    async def keep_header(self, header: Header, cert: Certificate | None, source: str) -> None:
        admit_header(self.validators, self.chain, header, cert)
        if await self._db_call(self.store.put_header, header, cert):
            self.counts["headers"] += 1

    async def keep_body(self, header: Header, txs: list[bytes], source: str) -> bool:
        """Keep a body of a held certified header; publish the receipt once it is durable."""
        return bool(await self.keep_bodies([admit_body(header, txs)], source))

    async def keep_bodies(self, bodies: list[AdmittedBody], source: str) -> list[int]:
        """Keep admitted bodies of held certified headers durably, then receipt them; the
        heights newly kept. A body whose header is not the one held at its height refuses
        the whole batch (`ChainError`) and nothing of it is written. (Admission, the Merkle
        root, was done once where the body arrived.) Batches that arrive while a commit
        is running are kept together in the next one: one transaction (one fsync) and
        one receipt batch (one BLS signature, one PUBACK) for all of them."""
        if not all(isinstance(b, AdmittedBody) for b in bodies):
            raise TypeError("keep_bodies takes bodies admit_body returned")
        if not bodies:
            return []
        done = asyncio.get_running_loop().create_future()
        self._to_commit.append((bodies, source, done))
        stored: list[AdmittedBody] = []
        with self.stages("wait_commit"):
            async with self._commit_lock:
                if not done.done():   # not taken by the commit before: take everything queued
                    group, self._to_commit = self._to_commit, []
                    stored = await self._commit_group(group)
        # Durable first (the commit), then the receipts, outside the lock: the next commit
        # need not wait for this one's PUBACK.
        await self._send_receipts([b.header for b in stored])
        return done.result()

    async def _commit_group(self, group: list[tuple[list[AdmittedBody], str, asyncio.Future]]) -> list[AdmittedBody]:
        """Keep a group of batches in one transaction, all or none (each body whole or
        absent); settle each caller's future; the bodies newly kept."""
        try:
            with self.stages("commit"):
                refusals, kept = await self._db_call(self._check_and_put, [bodies for bodies, _, _ in group])
        except Exception as exc:   # e.g. the disk: every caller of the group hears it
            for _, _, done in group:
                done.set_exception(exc)
            return []
        except BaseException:
            for _, _, done in group:
                done.cancel()
            raise
        stored = []
        for (bodies, source, done), refusal in zip(group, refusals):
            if refusal is not None:
                done.set_exception(refusal)
                continue
            mine = [b for b in bodies if b.header.height in kept]
            kept -= {b.header.height for b in mine}   # a height in two batches counts for the first
            for b in mine:
                self._count_stored(b, source)
            stored += mine
            done.set_result(sorted(b.header.height for b in mine))
        return stored

    def _check_and_put(self, batches: list[list[AdmittedBody]]) -> tuple[list[ChainError | None], set[int]]:
        """(In the store's thread.) Refuse each batch holding a body whose header is not
        the certified one held at its height; keep the others' bodies in one transaction."""
        with self.stages("commit_in_thread"):   # `commit` minus this: getting to the thread and back
            return self._check_and_put_here(batches)

    def _check_and_put_here(self, batches: list[list[AdmittedBody]]) -> tuple[list[ChainError | None], set[int]]:
        held = self.store.header_hashes([b.header.height for bodies in batches for b in bodies])
        refusals = [next((ChainError("unknown_header", "no such certified header held", height=b.header.height)
                          for b in bodies if held.get(b.header.height) != b.header.hash), None)
                    for bodies in batches]
        kept = self.store.put_bodies([b for bodies, bad in zip(batches, refusals) if bad is None for b in bodies])
        return refusals, set(kept)

    def _count_stored(self, b: AdmittedBody, source: str) -> None:
        self.counts["bodies"] += 1
        self.counts[f"bodies_from_{'proposer' if source == 'proposer' else 'peers'}"] += 1
        if self._filling is not None and source != "proposer":
            self._filling["bytes"] += sum(map(len, b.txs))
            self._filling["bodies"] += 1
        event(log, "stored", logging.DEBUG, height=b.header.height, txs=len(b.txs), source=source)

    async def _send_receipts(self, headers: list[Header]) -> None:
        """Receipt `headers` (distinct heights), BATCH_MAX blocks to a signature."""
        for k in range(0, len(headers), BATCH_MAX):
            with self.stages("sign"):
                batch = sign_receipts(self._sk, headers[k:k + BATCH_MAX], self.name, self.kind)
            self.counts["receipt_batches"] += 1
            if self._client is not None:
                with self.stages("publish_receipts"):
                    await self._client.publish(self.topics.receipts, batch.encode(), qos=1)

    def _refused(self, where: str, exc: ChainError, **fields) -> None:
        self.counts[exc.reason] += 1
        event(log, "refused", logging.WARNING, where=where, reason=exc.reason, detail=exc.detail[:200],
              height=exc.height, **fields)

    # -- the process ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        event(log, "start", node=self.name, kind=self.kind, chain=self.chain, peers=self.settings.peers,
              public_key=self.public_key.hex(), headers=self.store.header_height(),
              bodies=len(self.store.body_heights()))
        # Subscribed whatever the kind: a heavy node promoted later needs the proposer's
        # blocks at once (when both full nodes are promoted ones, nobody else fetches them).
        sync = self.settings.proposer_sync
        # Responses to our requests (the fill's bulk bytes) come on a lean link of their own
        # (`mqttlink`: a clean QoS 0 session that parses packets straight out of the socket's
        # reads; paho costs several times its CPU per message), not on the aiomqtt session.
        topics = [self.chain_topics.certs, self.topics.requests(self.name),
                  self.topics.store(self.name), self.topics.alive("+")]
        topics += [self.chain_topics.blocks(self.sync_name)] if sync else []
        # Liveness: "alive" retained on every connect, and the broker publishes the
        # retained last will the moment the connection drops uncleanly (a SIGKILL closes
        # the socket at once; a hung node after 1.5 x keepalive). Retained, so a verifier
        # that (re)subscribes later learns the current state.
        will = aiomqtt.Will(self.topics.alive(self.name), liveness(self.name, False), qos=1, retain=True)

        async def serve(client: aiomqtt.Client) -> None:
            self._client = client
            await self._say_alive()
            try:
                works = [self._consume(client), self._catch_up_loop(), self._status()]
                if sync:
                    if self.kind == "full":
                        await self._request_sync(force=True)
                    works.append(self._sync_loop())
                await until_stopped(stop, *works)
                if stop.is_set():   # a clean stop sends no last will: say it ourselves
                    await client.publish(self.topics.alive(self.name), liveness(self.name, False), qos=1,
                                         retain=True)
            finally:
                self._client = None

        client_id = f"storage-{self.chain}-{self.name}"
        self._inbox = LinkSession(self.mqtt, f"{self.mqtt.client_id or client_id}-resp",
                                  self.topics.responses(self.name), self._on_link_response, log, name="responses")
        inbox = asyncio.create_task(self._inbox.run(stop))
        try:
            await keep_connected(self.mqtt, client_id, topics, stop, serve, log, will=will)
        finally:
            stop.set()
            await asyncio.gather(inbox, return_exceptions=True)
            await self._inbox.close()
            event(log, "stop", **self.status())
            self.close()

    def close(self) -> None:
        for store in (self.store, self.server.store, self.reads):
            store.close()

    async def _say_alive(self) -> None:
        if self._client is not None:
            await self._client.publish(self.topics.alive(self.name), liveness(self.name, True, self.kind), qos=1,
                                       retain=True)

    async def become(self, kind: str, by: str) -> None:
        """The verifier's word: our kind is now `kind` (full: a promotion, so fetch every
        certified body from every peer holding it; heavy: a readmission). Durable first."""
        if kind == self.kind:
            await self._say_alive()
            return
        await self._db_call(self.store.set_kind, kind)
        old, self.kind = self.kind, kind
        self.server.kind = kind
        if kind == "full":
            self._filling = {"t0": time.monotonic(), "at": time.time(), "bytes": 0, "bodies": 0, "busy": 0.0,
                             "stages": self.stages.mark(), "cpu": time.process_time(),
                             "sampler": Sampler().start() if os.environ.get(FILL_PROFILE_ENV) else None}
        event(log, "kind_changed", old=old, kind=kind, by=by)
        await self._say_alive()
        self._wake.set()

    async def _filled(self) -> None:
        """After a promotion: say once when every certified body is held, with the copy figures."""
        f = self._filling
        if f is None or await self.wanted():
            return
        self._filling = None
        seconds = time.monotonic() - f["t0"]
        # `busy_s`: the catch-up rounds that fetched something; `seconds` also counts the
        # waits between rounds while new blocks kept arriving under load.
        stages = self.stages.since(f["stages"])
        # The process's CPU seconds (every thread) over the fill: on a shared machine a
        # steadier per-MB cost than wall seconds, which other processes stretch.
        cpu_s = round(time.process_time() - f["cpu"], 3)
        event(log, "filled", seconds=round(seconds, 3), busy_s=round(f["busy"], 3), bytes=f["bytes"],
              bodies=f["bodies"], since=f["at"], rate=round(f["bytes"] / f["busy"]) if f["busy"] > 0 else 0,
              cpu_s=cpu_s, stages=stages)
        if f["sampler"] is not None:
            profile = {"node": self.name, "bytes": f["bytes"], "busy_s": f["busy"], "cpu_s": cpu_s, "stages": stages,
                       **f["sampler"].stop().report()}
            out = Path(os.environ[FILL_PROFILE_ENV]) / f"{self.name}.json"
            await asyncio.to_thread(out.write_text, json.dumps(profile))

    def status(self) -> dict:
        stores = (self.store, self.server.store, self.reads)
        return {"headers": self.store.header_height(), **self.counts, **self.server.counts,
                **{f"store_{k}": sum(st.counts[k] for st in stores) for k in ("corrupt", "torn", "migrated")},
                **{f"catchup_{k}": v for k, v in self.catchup.counts.items()},
                **{f"request_{k}": v for k, v in self.requester.counts.items()},
                "bad_peers": dict(self.catchup.bad_peers)}

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            event(log, "status", **self.status())

    async def _publish_qos0(self, topic: str, payload: bytes) -> None:
        # Requests and responses are QoS 0: the requester retries on its own time-out,
        # and a broker must not queue chunks for a peer that has gone away.
        if self._client is None:
            raise StorageError("peer_timeout", "not connected")
        await self._client.publish(topic, payload, qos=0)

    async def _consume(self, client: aiomqtt.Client) -> None:
        requests, responses = self.topics.requests(self.name), self.topics.responses(self.name)
        async for msg in client.messages:
            topic = msg.topic.value
            payload = bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""
            if topic == responses:
                self.requester.on_response(payload)
            elif topic == requests:
                self._answer_soon(payload)
            elif topic.endswith("/alive"):
                self._peer_liveness(payload)
            else:
                try:
                    await self._on_chain_message(topic, payload)
                except ChainError as exc:
                    self._refused(topic.rsplit("/", 1)[-1], exc)

    def _peer_liveness(self, payload: bytes) -> None:
        try:
            peer, alive = parse_liveness(payload)
        except StorageError:
            self.counts["liveness_bad"] += 1
            return
        if peer in self.settings.peers:
            (self.catchup.down.discard if alive else self.catchup.down.add)(peer)

    async def _on_chain_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.store(self.name):
            await self._on_placement(payload)
            return
        msg = decode_block(payload)
        if topic == self.chain_topics.certs:
            await self.keep_header(msg.header, msg.cert, "certs")
            if self._follows_proposer() and not await self.has_body(msg.header.height):
                await self._request_sync()
            return
        # a block from the proposer's sync service
        if msg.txs is None:
            raise ChainError("message_schema", "a synced block carries its transactions", height=msg.header.height)
        await self.keep_header(msg.header, msg.cert, "proposer")
        await self.keep_body(msg.header, msg.txs, "proposer")
        if msg.header.height >= self._sync_end:
            await self._request_sync(force=True)  # a full batch: there may be more

    async def _on_placement(self, payload: bytes) -> None:
        p = parse_placement(payload)
        if p.role:
            await self.become(p.role, p.by)
            return
        if p.block is not None:
            msg = decode_block(canonical(p.block))
            if msg.txs is None:
                raise StorageError("bad_placement", "a placed block carries its transactions")
            await self.keep_header(msg.header, msg.cert, p.by or "placement")
            await self._db_call(self.store.place, [msg.header.height], p.by)
            await self.keep_body(msg.header, msg.txs, p.by or "placement")
        else:
            await self._db_call(self.store.place, p.heights, p.by)
            self._wake.set()  # fetch them from peers now
            # A placement sent again means the verifier has no receipt yet: say again
            # what is already held (a lost receipt must not leave a block unstored).
            again = [held[0] for h in p.heights
                     if (held := await self.header(h)) is not None and await self.has_body(h)]
            await self._send_receipts(again)
            self.counts["receipts_resent"] += len(again)
        self.counts["placements"] += 1

    def _answer_soon(self, payload: bytes) -> None:
        try:
            req = parse_request(payload)
        except StorageError as exc:
            self.counts[f"request_{exc.reason}"] += 1
            bad = getattr(exc, "request", None)
            if bad is not None:
                asyncio.ensure_future(self._reply(bad.sender, error_response(bad.id, exc.reason, exc.detail)))
            return
        if self._serving >= SERVING_MAX:
            self.counts["request_busy"] += 1
            asyncio.ensure_future(self._reply(req.sender, error_response(req.id, "busy")))
            return
        self._serving += 1
        asyncio.ensure_future(self._answer(req))

    async def _answer(self, req) -> None:
        try:
            try:
                with self.stages("serve"):
                    response = await self._db_call(self.server.answer, req, lock=self._serve_db)
            except Exception:  # e.g. a disk error: the peer hears why, the node keeps serving
                log.exception("answer_failed")
                response = error_response(req.id, "internal")
            await self._reply(req.sender, response)
        finally:
            self._serving -= 1

    async def _reply(self, peer: str, payload: bytes) -> None:
        try:
            await self._publish_qos0(self.topics.responses(peer), payload)
        except (StorageError, aiomqtt.MqttError):
            self.counts["reply_lost"] += 1

    def _on_link_response(self, topic: str, payload: bytes) -> None:
        self.requester.on_response(payload)

    async def _catch_up_loop(self) -> None:
        if not self.settings.peers:
            return await asyncio.Event().wait()
        for _ in range(100):   # no request before the responses' link is up (its answers would be lost)
            if self._inbox is None or self._inbox.link is not None:
                break
            await asyncio.sleep(0.05)
        while True:
            t0 = time.monotonic()
            try:
                summary = await self.catchup.round()
            except aiomqtt.MqttError:
                raise  # the session is gone: keep_connected reconnects
            except Exception:  # a bug in one round must not stop serving; the next round retries
                log.exception("catchup_failed")
                summary = {}
            if summary.get("headers") or summary.get("fetched"):
                event(log, "catchup", seconds=round(time.monotonic() - t0, 3), **summary)
                if self._filling is not None and summary.get("fetched"):
                    # (a round under way at the promotion counts from the promotion)
                    self._filling["busy"] += time.monotonic() - max(t0, self._filling["t0"])
            await self._after_round(summary)
            await self._filled()
            if summary.get("fetched"):
                continue  # more may be waiting (a fill, blocks arriving under load): no pause while there is work
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.catchup_s)
            except TimeoutError:
                pass

    async def _sync_loop(self) -> None:
        """Ask the proposer again while a certified block's body is missing: a request
        held back by the rate limit, or a batch lost, must not leave a gap for good."""
        while True:
            await asyncio.sleep(SYNC_RETRY_S)
            if (self._follows_proposer() and time.monotonic() - self._last_sync >= SYNC_RETRY_S
                    and await self._db_call(self._lacking)):
                await self._request_sync(force=True)

    def _follows_proposer(self) -> bool:
        # A promoted node fills from its peers (DRS), not from the proposer, until it is full.
        return self.kind == "full" and self.settings.proposer_sync and self._filling is None

    async def _after_round(self, summary: dict) -> None:
        """While filling: bodies wanted that no peer could give (certified while no full
        node followed the proposer, e.g. both full nodes promoted ones) come from the proposer."""
        if (self._filling is not None and self.settings.proposer_sync and summary.get("wanted")
                and not summary.get("fetched")):
            self.counts["fill_from_proposer"] += 1
            await self._request_sync(force=True)

    def _lacking(self) -> bool:
        return self.store.first_missing_body() <= self.store.header_height()

    async def _request_sync(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._client is None or (not force and now - self._last_sync < SYNC_RETRY_S):
            return
        self._last_sync = now
        start = await self._db_call(self.store.first_missing_body)
        self._sync_end = start + SYNC_BATCH - 1
        await self._client.publish(self.chain_topics.sync, canonical({"validator": self.sync_name, "from": start}),
                                   qos=1)
