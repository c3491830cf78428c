"""A validator: re-runs every proposed block and signs each height at most once.

`Voter` is the rule, without I/O: a header is signed only after the replica has
re-executed it against the last certified block, and only after the promise
"at this height I sign this hash" is on disk (SQLite, synchronous=FULL). A crash
between promise and signature loses nothing: asked again, the validator signs
the same hash; asked for any other header at that height, it refuses forever.

`ValidatorNode` moves the bytes over MQTT: proposals in, votes out, certificates
in, and catch-up from the proposer when it has fallen behind. An app may add
`SideWork`: topics of its own whose messages it handles on the node's idle time
(the area app checks meter signatures on the reading stream before a block
carries them); the chain's own messages always come first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable, Protocol

import aiomqtt

from gridledger.config import MqttConfig
from gridledger.logs import event
from gridledger.mqtt import keep_connected, until_stopped
from gridledger.mqttlink import LinkSession

from . import bls
from .block import ChainError, Header, Vote, canonical, cert_message
from .net import SYNC_BATCH, BlockMsg, Topics, decode_block
from .replica import Replica

__all__ = ["Voter", "ValidatorNode", "SideWork"]

log = logging.getLogger("gridledger.chain.validator")

MAX_FUTURE_MS = 30_000  # a proposal's clock may run this far ahead of ours
SYNC_RETRY_S = 1.0


class Voter:
    def __init__(self, replica: Replica, index: int, secret_key: int):
        if replica.validators.members[index].public_key != bls.SkToPk(secret_key):
            raise ChainError("wrong_key", f"secret key is not validator {index}'s")
        self.replica = replica
        self.index = index
        self._sk = secret_key

    def vote(self, header: Header, txs: list[bytes], *, now_ms: int | None = None) -> Vote:
        """Check `header` and sign it, or raise `ChainError` saying why not."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        store = self.replica.store
        promised = store.vote_for(header.height)
        if promised is not None and promised != header.hash:
            raise ChainError("conflicting_header", f"already signed {promised[:16]}… at height {header.height}",
                             height=header.height)
        if header.time > now_ms + MAX_FUTURE_MS:
            raise ChainError("time_in_future", f"{header.time - now_ms} ms ahead", height=header.height)
        self.replica.check(header, txs)
        if store.promise(header.height, header.hash) != header.hash:  # raced: keep the first promise
            raise ChainError("conflicting_header", f"height {header.height}", height=header.height)
        return self.sign(header)

    def sign(self, header: Header) -> Vote:
        msg = cert_message(header.chain, header.height, header.hash)
        return Vote(header.chain, header.height, header.hash, self.index, bls.Sign(self._sk, msg))


class SideWork(Protocol):
    """Messages beside the chain's, for work that can be done ahead of a proposal.
    Nothing received this way is a vote or changes state. They arrive at QoS 0 on
    links of their own: one may be lost, and the work it saved is then done later."""
    topics: tuple[str, ...]

    def offer(self, topic: str, payload: bytes) -> None:
        """Take a message on one of `topics`; must return at once (queue it)."""

    async def work(self, idle: Callable[[], bool]) -> None:
        """Run while connected; do a short slice of work only while `idle()`."""


class ValidatorNode:
    def __init__(self, voter: Voter, mqtt: MqttConfig, *, name: str, side: SideWork | None = None):
        self.voter = voter
        self.replica = voter.replica
        self.mqtt = mqtt
        self.name = name
        self.topics = Topics(self.replica.chain)
        self.counts: Counter[str] = Counter()
        self._pending: dict[str, BlockMsg] = {}   # proposals signed, awaiting their certificate
        self._stash: BlockMsg | None = None       # a proposal from beyond our head
        self._last_sync = 0.0
        self._sync_end = 0
        self.side = side
        self._chain_topics = (self.topics.proposals, self.topics.certs, self.topics.blocks(voter.index))
        self._busy = False  # a chain message is being handled (its vote may not have left yet)

    async def run(self, stop: asyncio.Event) -> None:
        event(log, "start", validator=self.name, index=self.voter.index, chain=self.replica.chain,
              height=self.replica.height)
        # Side topics come on lean links of their own at QoS 0 (gridledger/mqttlink.py): a
        # validator takes every reading of its area there, and through aiomqtt each cost
        # it about 100 µs before any check. Missing one costs only a cache miss later.
        links = [LinkSession(self.mqtt, f"{self.mqtt.client_id or f'validator-{self.name}'}-side{i}", t,
                             self.side.offer, log, name=f"side{i}")
                 for i, t in enumerate(self.side.topics if self.side is not None else ())]

        async def serve(client: aiomqtt.Client) -> None:
            await self._request_sync(client, force=True)  # whatever was certified while we were away
            await self._serve(client, stop)

        try:
            await asyncio.gather(keep_connected(self.mqtt, f"validator-{self.name}", self._chain_topics, stop, serve,
                                                log),
                                 *(s.run(stop) for s in links))
        finally:
            for s in links:
                await s.close()
            self.replica.store.conn.close()
            event(log, "stop", height=self.replica.height, **self.counts)

    async def _serve(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        async def consume() -> None:
            async for msg in client.messages:
                payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
                topic = msg.topic.value
                self._busy = True
                try:
                    await self.handle(client, topic, bytes(payload))
                finally:
                    self._busy = False

        def idle() -> bool:  # nothing of the chain's in hand or waiting in the client's queue
            return not self._busy and len(client.messages) == 0

        side = () if self.side is None else (self.side.work(idle),)
        await until_stopped(stop, consume(), *side)

    async def handle(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        try:
            msg = decode_block(payload)
            if msg.header.chain != self.replica.chain:
                raise ChainError("wrong_chain", msg.header.chain)
            if topic == self.topics.proposals:
                await self._on_proposal(client, msg)
            elif topic == self.topics.certs:
                await self._on_cert(client, msg)
            else:
                await self._on_block(client, msg)
        except ChainError as exc:
            self.counts[exc.reason] += 1
            event(log, "refused", logging.WARNING, topic=topic.rsplit("/", 1)[-1], reason=exc.reason,
                  detail=exc.detail, height=exc.height)

    async def _on_proposal(self, client: aiomqtt.Client, msg: BlockMsg) -> None:
        h, head = msg.header.height, self.replica.height
        if msg.txs is None:
            raise ChainError("message_schema", "a proposal carries its transactions")
        if h <= head or (h == head + 1 and msg.header.hash in self._pending):
            # A resend: the proposer may have lost our vote. Same hash, same signature.
            if self.replica.store.vote_for(h) == msg.header.hash:
                await self._send_vote(client, self.voter.sign(msg.header))
            return
        self.replica.validators.check_proposal(msg.header, msg.proposer_sig)
        if h > head + 1:
            self._stash = msg
            await self._request_sync(client)
            return
        vote = self.voter.vote(msg.header, msg.txs)
        self._pending[msg.header.hash] = msg
        self.counts["voted"] += 1
        await self._send_vote(client, vote)

    async def _send_vote(self, client: aiomqtt.Client, vote: Vote) -> None:
        await client.publish(self.topics.votes, canonical(vote.to_dict()), qos=1)

    async def _on_cert(self, client: aiomqtt.Client, msg: BlockMsg) -> None:
        h = msg.header.height
        if h <= self.replica.height or msg.cert is None:
            return
        signed = self._pending.get(msg.header.hash)
        if h == self.replica.height + 1 and signed is not None:
            self.replica.commit(signed.header, signed.txs, msg.cert)
            self._certified()
        else:
            await self._request_sync(client)

    async def _on_block(self, client: aiomqtt.Client, msg: BlockMsg) -> None:
        if msg.cert is None or msg.txs is None:
            raise ChainError("message_schema", "a synced block carries its transactions and certificate")
        if msg.header.height != self.replica.height + 1:
            return
        self.replica.commit(msg.header, msg.txs, msg.cert)
        self.counts["synced"] += 1
        self._certified()
        stash = self._stash
        if stash is not None and stash.header.height == self.replica.height + 1:
            self._stash = None
            await self._on_proposal(client, stash)
        elif stash is not None and self.replica.height >= self._sync_end:
            await self._request_sync(client, force=True)  # the batch is done; still behind

    def _certified(self) -> None:
        self._pending.clear()
        event(log, "certified", logging.DEBUG, height=self.replica.height)

    async def _request_sync(self, client: aiomqtt.Client, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sync < SYNC_RETRY_S:
            return
        self._last_sync = now
        self._sync_end = self.replica.height + SYNC_BATCH
        await client.publish(self.topics.sync, canonical({"validator": self.voter.index,
                                                          "from": self.replica.height + 1}), qos=1)
