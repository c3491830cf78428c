"""A follower: a full replica of a chain that does not vote.

It takes only certified blocks, each checked like a validator would (the
certificate against the validator set, the body against the header, the app
re-run), so whatever reads its store reads certified state. It learns of new
blocks from the certificates the proposer publishes and fetches them in
batches from the proposer's sync service, under its own name; a slow poll
covers a certificate it missed while disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import aiomqtt

from gridledger.config import MqttConfig
from gridledger.logs import event
from gridledger.mqtt import keep_connected, until_stopped

from .block import ChainError, canonical
from .net import SYNC_BATCH, Topics, decode_block
from .replica import Replica

__all__ = ["Follower"]

log = logging.getLogger("gridledger.chain.follower")

SYNC_RETRY_S = 1.0


class Follower:
    def __init__(self, replica: Replica, mqtt: MqttConfig, *, name: str, poll_s: float = 5.0):
        self.replica = replica
        self.mqtt = mqtt
        self.name = name
        self.poll_s = poll_s
        self.topics = Topics(replica.chain)
        self.counts: Counter[str] = Counter()
        self._last_sync = 0.0
        self._sync_end = 0

    async def run(self, stop: asyncio.Event) -> None:
        event(log, "start", chain=self.replica.chain, follower=self.name, height=self.replica.height)

        async def serve(client: aiomqtt.Client) -> None:
            await self._request(client, force=True)
            await until_stopped(stop, self._consume(client), self._poll(client))

        await keep_connected(self.mqtt, f"follower-{self.replica.chain}-{self.name}",
                             (self.topics.certs, self.topics.blocks(self.name)), stop, serve, log)

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
            await self.handle(client, msg.topic.value, bytes(payload))

    async def handle(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        try:
            msg = decode_block(payload)
            if msg.header.chain != self.replica.chain:
                raise ChainError("wrong_chain", msg.header.chain)
            h = msg.header.height
            if topic == self.topics.certs:
                if h > self.replica.height:
                    await self._request(client)
                return
            if msg.cert is None or msg.txs is None:
                raise ChainError("message_schema", "a synced block carries its transactions and certificate")
            if h != self.replica.height + 1:
                return
            await asyncio.to_thread(self.replica.commit, msg.header, msg.txs, msg.cert)
            self.counts["synced"] += 1
            event(log, "certified", logging.DEBUG, chain=self.replica.chain, height=h)
            if h >= self._sync_end:
                await self._request(client, force=True)  # a full batch: there may be more
        except ChainError as exc:
            self.counts[exc.reason] += 1
            event(log, "refused", logging.WARNING, chain=self.replica.chain, reason=exc.reason,
                  detail=exc.detail, height=exc.height)

    async def _poll(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._request(client, force=True)

    async def _request(self, client: aiomqtt.Client, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sync < SYNC_RETRY_S:
            return
        self._last_sync = now
        self._sync_end = self.replica.height + SYNC_BATCH
        await client.publish(self.topics.sync, canonical({"validator": self.name, "from": self.replica.height + 1}),
                             qos=1)
