"""The gateway as proposer of its area chain.

Readings are acked once durable in the gateway's store; this loop then moves
them, in acceptance order, into blocks: it builds the next block from readings
not yet in one (plus equivocation alerts), stores the proposal and marks those
readings in one transaction, and has it certified by the validators before the
next. After a restart the stored proposal is certified first, unchanged, so an
acknowledged reading ends up in the chain exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt

from certlog.app import InvalidBlock
from certlog.block import Header
from certlog.proposer import Proposer
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog import bls
from certlog.validators import load_validator_set, read_secret_key
from gridledger.errors import ConfigError
from gridledger.logs import event

from .areaapp import AreaApp, equivocation_alert, registry_tx
from .store import GatewayStore, block_readings

if TYPE_CHECKING:
    from gridledger.mqttlink import LinkSession
    from gridledger.wire import Reading

    from .gateway import ChainSettings

__all__ = ["AreaChain"]

log = logging.getLogger("gridledger.gateway.chain")

# Readings held in memory from their ingest until a block takes them (about 3 KB
# each: 30 MB at most). A reading not held is rebuilt from its row when its block is
# built, 5-9 µs more (in-process harness): while the validators lag the ingest (a burst, a meter
# backlog flushed after an outage) later blocks came mostly from rows. In
# bench/ingest.py's four-validator pass, building blocks took 19.1-19.6 µs a reading
# with four blocks' worth held (4,000), about 1.5 µs more than its one-validator
# pass, which never lags; with 10,000 held, the same as that pass.
HELD_READINGS = 10_000


class AreaChain:
    def __init__(self, settings: "ChainSettings", area: str, database: Path, store: GatewayStore, app: AreaApp):
        self.settings = settings
        self.gateway_store = store
        # Its own connection: the ingest commits from a worker thread at the same time.
        self.conn = connect(database)
        vset = load_validator_set(settings.validators)
        self._sk = read_secret_key(settings.proposer_key)
        if vset.proposer is None or vset.proposer.public_key != bls.SkToPk(self._sk):
            raise ConfigError(f"{settings.proposer_key} is not the proposer key in {settings.validators}")
        # A block's readings are not written twice: its body keeps the leading
        # registry and alert transactions, and the readings are rebuilt from the
        # gateway's `readings` rows (`block_readings`) when the block is read.
        self.replica = Replica(area, app, ChainStore(self.conn, elsewhere=block_readings), vset)
        self.proposer: Proposer | None = None
        self.prefix = f"gl/v1/chains/{area}/"
        self.more = asyncio.Event()
        self.uncertified = 0  # readings waiting for a block, as of the last block built
        # Readings the ingest just committed, by rowid: the block takes them as they
        # are instead of rebuilding each from its row (hash and all). Bounded
        # (HELD_READINGS); what is not here (after a restart, or beyond the bound while
        # the chain lags) comes from the store.
        self.held: dict[int, "Reading"] = {}
        self._held_max = HELD_READINGS
        self._db = asyncio.Lock()  # one user of self.conn at a time (threads)

    def committed(self, first_rowid: int | None, readings: list["Reading"]) -> None:
        """`readings` are durable, as rowids `first_rowid` on (`GatewayStore.commit`):
        hold them for the block that takes them."""
        if first_rowid is None:
            return
        room = self._held_max - len(self.held)
        for i, r in enumerate(readings[:max(room, 0)]):
            self.held[first_rowid + i] = r

    def subscriptions(self) -> list[str]:
        return [f"{self.prefix}votes", f"{self.prefix}sync"]

    def status(self) -> dict:
        p = self.proposer
        latency = p.last_latency_s if p else None
        return {"height": self.replica.height,
                "cert_latency_ms": round(latency * 1000, 1) if latency is not None else None,
                **(dict(p.counts) if p else {})}

    def metrics(self) -> list:
        from gridledger.metrics import Snapshot
        p = self.proposer
        latency = p.last_latency_s if p and p.last_latency_s is not None else 0.0
        return [
            Snapshot("gridledger_chain_height", "last certified height", "gauge", (), {(): self.replica.height}),
            Snapshot("gridledger_chain_uncertified", "readings acked but not yet in a certified block", "gauge", (),
                     {(): self.uncertified}),
            Snapshot("gridledger_chain_cert_latency_seconds", "last block's proposal-to-certificate time", "gauge",
                     (), {(): latency}),
            Snapshot("gridledger_chain_events", "proposer events (certified, resent, refused votes)", "counter",
                     ("event",), {(k,): v for k, v in (p.counts.items() if p else [])}),
        ]

    def on_message(self, client: aiomqtt.Client, msg: aiomqtt.Message) -> None:
        if self.proposer is None:
            return
        payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
        if msg.topic.value.endswith("/votes"):
            self.proposer.on_vote(bytes(payload))
        else:
            asyncio.get_running_loop().create_task(self._sync(bytes(payload)))

    async def _sync(self, payload: bytes) -> None:
        async with self._db:
            await self.proposer.on_sync(payload)

    async def run(self, client: aiomqtt.Client, lean: "LinkSession | None" = None) -> None:
        self.proposer = Proposer(self.replica, self.publisher(client, lean), self._sk,
                                 resend_s=self.settings.resend_s, commit_lock=self._db)
        await self.proposer.run(self._prepare, self.more, block_max=self.settings.block_max,
                                block_wait_s=self.settings.block_wait_s)

    @staticmethod
    def publisher(client: aiomqtt.Client, lean: "LinkSession | None"):
        """The proposer's publish: on `lean` (the gateway's reading link, QoS 0) while
        it is up, else on `client` at QoS 1. Through paho a 1.3 MB proposal cost the
        gateway's core about 5 µs a reading (bench/ingest.py under py-spy): a QoS 1
        packet built and copied in Python, then written a slice at a time. QoS 0 loses
        nothing the chain needs: a proposal without its votes is sent again every
        `resend_s`, and a validator that missed a certificate asks for the block by
        sync when the next proposal comes."""
        async def publish(topic: str, payload: bytes) -> None:
            if lean is not None and lean.publish_many([(topic, payload)]):
                return
            await client.publish(topic, payload, qos=1)
        return publish

    def _prepare(self) -> tuple[Header, list[bytes]] | None:
        """Next block from what is durable but not yet in a block (runs in a worker thread).

        A transaction the app refuses (it passed ingest, so only a registry change
        or a bug gets here) is set aside with height 0 and logged, never retried
        for ever: one bad reading must not stop the chain.
        """
        store, limit = self.gateway_store, self.settings.block_max
        while True:
            alerts = store.unblocked_equivocations(self.conn)[:limit]
            rowids, readings = store.unblocked(self.conn, limit - len(alerts), self.held)
            self.uncertified = store.unblocked_count(self.conn)
            if not readings and not alerts:
                return None
            txs = [equivocation_alert(a, b) for _, a, b in alerts] + [r.to_json() for r in readings]
            lead = self._registry_move()
            decoded = [None] * (len(lead) + len(alerts)) + readings  # the app need not parse what was just encoded

            def mark(header: Header) -> None:
                store.mark_blocked(self.conn, header.height, rowids, [e for e, _, _ in alerts])

            try:
                return (self.proposer.prepare(lead + txs, mark, decoded=decoded, kept=len(lead) + len(alerts)),
                        lead + txs)
            except InvalidBlock as exc:
                if exc.index is None or exc.index < len(lead):
                    raise
                i = exc.index - len(lead)
                event(log, "unchainable", logging.ERROR, reason=exc.reason, detail=exc.detail)
                with self.replica.store.transaction():
                    if i < len(alerts):
                        store.mark_blocked(self.conn, 0, [], [alerts[i][0]])
                    else:
                        store.mark_blocked(self.conn, 0, [rowids[i - len(alerts)]], [])

    def _registry_move(self) -> list[bytes]:
        """With the registry chain: a leading transaction moving the area chain to the
        latest registry height this gateway has certified, if it moved."""
        app = self.replica.app
        if not app.chained:
            return []
        head = self.replica.head
        current = head.app.get("registry_height", 0) if head else 0
        latest = app.registry.height
        return [registry_tx(latest, app.registry.hash_at(latest))] if latest > current else []

    def close(self) -> None:
        self.conn.close()

