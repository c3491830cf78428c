"""Reads with fall-back: one transaction of a certified area block, from whichever
replica serves it right.

The replicas of a block come from the certified P-chain state (the nodes that
receipted it), best first by RV; each answer (`tx` op: the transaction, its
Merkle path, the header) is checked against the header hash the P chain
recorded for that height and the path against that header's tx root. A wrong
answer, a refusal or a time-out moves on to the next replica; when none answers
right the read fails with `ReadError` (reason `no_verified_replica`). Nothing
unverified is ever returned.

`read_tx` and `check_tx_answer` are pure over an `ask` function; `PChainView`
reads a P-chain replica's SQLite file (read-only); `Reader` is the MQTT edge.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import aiomqtt
import rlp

from certlog import merkle
from certlog.block import Certificate, ChainError, Header
from certlog.mpt import Trie
from certlog.store import NodeDB
from certlog.validators import ValidatorSet, load_validator_set
from gridledger.config import MqttConfig, mqtt_section, read_toml, section
from gridledger.errors import ConfigError
from gridledger.mqtt import auth_options

from .catchup import Requester
from .pchainapp import PGenesis, Roles, block_key, decode_block_leaf, load_pgenesis, node_key, roles_key
from .reliability import Measure, rank
from .storagewire import StorageError, StorageTopics

__all__ = ["ReadError", "ReadResult", "Replicas", "check_tx_answer", "order_replicas", "read_tx", "PChainView",
           "Reader", "ReaderSettings", "load_reader_config"]

SNAPSHOT_LOOKBACK = 64   # certified P blocks searched, newest first, for the latest RV snapshot


class ReadError(StorageError):
    """No replica answered with data that verifies; `attempts` says who said what."""

    def __init__(self, reason: str, detail: str = "", *, attempts: Sequence[tuple[str, str]] = (),
                 height: int | None = None):
        super().__init__(reason, detail, height=height)
        self.attempts = list(attempts)


@dataclass(frozen=True, slots=True)
class Replicas:
    height: int
    hash: str                 # the certified area header's hash, as the P chain recorded it
    nodes: tuple[str, ...]    # the nodes that receipted the block, best first


@dataclass(frozen=True, slots=True)
class ReadResult:
    height: int
    index: int
    tx: bytes
    header: Header
    node: str                                 # the replica that answered right
    attempts: tuple[tuple[str, str], ...]     # (node, reason) of those tried before it


def order_replicas(header_hash: str, nodes: Sequence[str], measures: dict[str, Measure],
                   loads: dict[str, int]) -> list[str]:
    """Best first by RV: a node's CP, NP, CRE from the latest snapshot (full nodes are not
    in snapshots: 1000 each), its T from the P-chain state; ties as `reliability.rank`."""
    ms = []
    for n in nodes:
        m = measures.get(n)
        ms.append(Measure(n, m.cp if m else 1000, m.np if m else 1000, m.cre if m else 1000, loads.get(n, 0)))
    return rank(header_hash, ms)


def check_tx_answer(meta: dict, *, area: str, height: int, header_hash: str, index: int) -> tuple[bytes, Header]:
    """The transaction and header of a `tx` answer, or `StorageError`: `read_wrong_header`
    (not the certified header the P chain names), `read_bad_path`, `read_bad_answer`."""
    try:
        header = Header.from_dict(meta.get("header"))
        tx = bytes.fromhex(meta["tx"])
        path = meta["path"]
        if not isinstance(path, list) or meta.get("index") != index:
            raise ValueError("path or index")
    except (ChainError, KeyError, TypeError, ValueError) as exc:
        raise StorageError("read_bad_answer", str(exc)[:120], height=height) from None
    if (header.chain, header.height, header.hash) != (area, height, header_hash):
        raise StorageError("read_wrong_header", f"answer's header {header.hash[:16]}… is not the certified one",
                           height=height)
    if not merkle.verify_path(header.tx_root, tx, index, header.txs, path):
        raise StorageError("read_bad_path", f"tx {index} does not reach the tx root", height=height)
    return tx, header


Ask = Callable[..., Awaitable[tuple[dict, bytes]]]


async def read_tx(ask: Ask, replicas: Replicas, index: int, *, area: str, timeout_s: float) -> ReadResult:
    """Ask each replica in turn (best first) until one answers with data that verifies."""
    attempts: list[tuple[str, str]] = []
    for node in replicas.nodes:
        try:
            meta, _ = await ask(node, "tx", timeout_s=timeout_s, height=replicas.height, index=index)
            tx, header = check_tx_answer(meta, area=area, height=replicas.height, header_hash=replicas.hash,
                                         index=index)
        except ChainError as exc:
            attempts.append((node, exc.reason))
            continue
        return ReadResult(replicas.height, index, tx, header, node, tuple(attempts))
    raise ReadError("no_verified_replica", f"block {replicas.height} tx {index}: "
                    + (", ".join(f"{n}: {r}" for n, r in attempts) or "no replica receipted it"),
                    attempts=attempts, height=replicas.height)


class PChainView:
    """The certified P-chain state of a replica's SQLite file (read-only): the head's
    certificate is checked against the P chain's validator set before its state is used."""

    def __init__(self, database: Path, genesis: PGenesis, validators: ValidatorSet):
        self.database, self.genesis, self.validators = Path(database), genesis, validators
        self.conn = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=10)
        self.height = 0
        self._trie: Trie | None = None
        self.measures: dict[str, Measure] = {}

    def close(self) -> None:
        self.conn.close()

    def refresh(self) -> int:
        """Move to the newest certified P block; its height (0: none yet)."""
        row = self.conn.execute("SELECT height, header, cert FROM chain_blocks WHERE cert IS NOT NULL "
                                "ORDER BY height DESC LIMIT 1").fetchone()
        if row is None or row[0] == self.height:
            return self.height
        header, cert = Header.decode(row[1]), Certificate.from_dict(json.loads(row[2]))
        self.validators.check_certificate(cert, header, remember=True)
        self.height, self._trie = row[0], Trie(NodeDB(self.conn), bytes.fromhex(header.state_root))
        self.measures = self._latest_snapshot()
        return self.height

    def _latest_snapshot(self) -> dict[str, Measure]:
        rows = self.conn.execute("SELECT data FROM chain_txs WHERE height > ? AND height <= ? "
                                 "ORDER BY height DESC, idx DESC", (self.height - SNAPSHOT_LOOKBACK, self.height))
        for (data,) in rows:
            rec = json.loads(data)
            if "snapshot" in rec:
                return {m["node"]: Measure(m["node"], m["cp"], m["np"], m["cre"], m["t"]) for m in rec["snapshot"]}
        return {}

    def roles(self) -> Roles:
        return Roles.of(self.genesis, self._get(roles_key()))

    def _get(self, key: bytes):
        raw = self._trie.get(key) if self._trie is not None else None
        return rlp.decode(raw) if raw else None

    def replicas(self, height: int) -> Replicas | None:
        """The nodes that receipted area block `height`, best first (None: not placed)."""
        if self._trie is None:
            return None
        raw = self._trie.get(block_key(height))
        if not raw:
            return None
        leaf = decode_block_leaf(raw)
        loads = {}
        for n in leaf["receipted"]:
            v = self._get(node_key(n))
            loads[n] = int.from_bytes(v[0], "big") if v else 0
        return Replicas(height, leaf["hash"], tuple(order_replicas(leaf["hash"], leaf["receipted"], self.measures,
                                                                   loads)))


@dataclass(frozen=True, slots=True, kw_only=True)
class ReaderSettings:
    area: str
    p_database: Path          # a P-chain replica (a validator's or the verifier's), opened read-only
    p_validators: Path        # the P chain's validator set: the head's certificate is checked
    genesis: Path             # pchain-genesis.toml
    name: str = ""            # our name for responses (default: reader-<random>)
    timeout_s: float = 2.0    # per replica, before the next is asked


def load_reader_config(path: Path) -> tuple[ReaderSettings, MqttConfig]:
    path = Path(path)
    doc = read_toml(path)
    s = section(ReaderSettings, doc, "reader", path.parent, ("p_database", "p_validators", "genesis"))
    if s.timeout_s <= 0:
        raise ConfigError("[reader] timeout_s must be positive")
    return s, mqtt_section(doc, path)


class Reader:
    """`async with Reader(settings, mqtt) as r: await r.read(height, index)`."""

    def __init__(self, settings: ReaderSettings, mqtt: MqttConfig, *, window: int = 16):
        self.settings, self.mqtt = settings, mqtt
        self.name = settings.name or f"reader-{secrets.token_hex(4)}"
        self.topics = StorageTopics(settings.area)
        self.view = PChainView(settings.p_database, load_pgenesis(settings.genesis),
                               load_validator_set(settings.p_validators))
        self.requester = Requester(self._publish, self.name, self.topics, timeout_s=settings.timeout_s,
                                   window=window, retries=0)
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "Reader":
        self._client = aiomqtt.Client(self.mqtt.host, self.mqtt.port, identifier=self.name, clean_session=True,
                                      **auth_options(self.mqtt))
        await self._client.__aenter__()
        await self._client.subscribe(self.topics.responses(self.name), qos=0)
        self._task = asyncio.create_task(self._consume())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.__aexit__(*exc)
        self.view.close()

    async def _consume(self) -> None:
        async for msg in self._client.messages:
            if isinstance(msg.payload, (bytes, bytearray)):
                self.requester.on_response(bytes(msg.payload))

    async def _publish(self, topic: str, payload: bytes) -> None:
        await self._client.publish(topic, payload, qos=0)

    async def read(self, height: int, index: int) -> ReadResult:
        self.view.refresh()
        replicas = self.view.replicas(height)
        if replicas is None:
            raise ReadError("not_placed", f"area block {height} is not in the certified P-chain state",
                            height=height)
        return await read_tx(self.requester.ask, replicas, index, area=self.settings.area,
                             timeout_s=self.settings.timeout_s)
