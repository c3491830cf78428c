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

With `r_database` set it also audits every storage node and proposes the R chain
(`auditor.py`); a certified `wrong` outcome (or a heavy or light node's CRE below
`cre_floor`) re-places the node's replicas with P-chain `replace` records.

A full node is dead on its last will (`gl/v1/storage/{area}/{node}/alive`, alive
false) or on `dead_missing` consecutive certified `missing` audits, whichever
comes first; the most reliable heavy node is then promoted (a P-chain `promote`
record, and `{"role": "full"}` on its store topic). A dead node that says it is
alive again is readmitted as heavy once its headers have caught up (`readmit`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import aiomqtt

from certlog import bls
from certlog.block import Certificate, ChainError, Header
from certlog.mpt import Trie
from certlog.net import Topics, decode_block
from certlog.proposer import Proposer
from certlog.validators import load_validator_set, read_secret_key
from gridledger.config import MqttConfig, mqtt_section, read_toml, section
from gridledger.errors import ConfigError
from gridledger.logs import event
from gridledger.metrics import MetricsConfig, Snapshot, serve as serve_metrics
from gridledger.mqtt import keep_connected, until_stopped

from .auditor import Auditor
from .catchup import Requester
from .pchain import pchain_id, pchain_replica
from .pchainapp import (Roles, block_key, decode_block_leaf, placement_tx, promote_block, promote_tx, promotion,
                        readmit_tx, receipt_tx, receipts_tx, replace_tx, replacement)
from .receipts import ReceiptBatch, StorageReceipt, load_receipt, verify_receipt, verify_receipts
from .reliability import Credibility, Measure, cp_from_report, np_from_rtts, place
from .storagewire import HEADERS_MAX, NODE_RE, StorageError, StorageTopics, encode_placement, parse_liveness

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
    r_database: Path | None = None  # the R chain and its queue: audits are on when set
    r_validators: Path | None = None  # the R chain's set (default: `validators`, the same verifier key)
    r_chain: str = ""               # default R-{area}
    audit_s: float = 30.0           # mean seconds between two audits of a node (exponential)
    audit_deadline_s: float = 2.0   # an answer later than this is `late`
    audit_late_s: float = 2.0       # ... and none by deadline + this is `missing`
    cre_floor: int = 500            # a heavy or light node below it has every block re-placed
    dead_missing: int = 3           # this many missing audits in a row make a full node dead (or its last will)


@dataclass(frozen=True, slots=True)
class VerifierConfig:
    verifier: VerifierSettings
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load_verifier_config(path: Path) -> VerifierConfig:
    path = Path(path)
    doc = read_toml(path)
    s = section(VerifierSettings, doc, "verifier", path.parent,
                ("database", "proposer_key", "validators", "area_validators", "genesis", "r_database",
                 "r_validators"))
    if not NODE_RE.match(s.name):
        raise ConfigError("[verifier] name must match [A-Za-z0-9_-]{1,64}")
    if min(s.probe_s, s.np_ref_ms, s.retry_s, s.timeout_s) <= 0 or not 0 <= s.cre_start <= 1000:
        raise ConfigError("[verifier] probe_s, np_ref_ms, retry_s, timeout_s must be positive, cre_start 0..1000")
    if type(s.dead_missing) is not int or s.dead_missing < 1:
        raise ConfigError("[verifier] dead_missing must be an integer >= 1")
    if min(s.audit_s, s.audit_deadline_s, s.audit_late_s) <= 0 or not 0 <= s.cre_floor <= 1000:
        raise ConfigError("[verifier] audit_s, audit_deadline_s, audit_late_s must be positive, cre_floor 0..1000")
    pchain_id(s.area, s.chain)
    pchain_id(s.area, s.r_chain, "R")
    return VerifierConfig(s, mqtt_section(doc, path), section(MetricsConfig, doc, "metrics"))


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
                sent_at REAL NOT NULL, tries INTEGER NOT NULL, complete INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS area_blocks (height INTEGER PRIMARY KEY, header BLOB NOT NULL,
                                                    cert BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS p_roles (id INTEGER PRIMARY KEY CHECK (id = 1), full TEXT NOT NULL,
                                                dead TEXT NOT NULL);""")
        self.area_topics, self.topics = Topics(s.area), StorageTopics(s.area)
        self.p_topics = Topics(self.replica.chain)
        if s.cre_start != self.genesis.cre_start:
            raise ConfigError(f"[verifier] cre_start {s.cre_start} differs from the genesis's {self.genesis.cre_start}")
        self.cre = Credibility(self.genesis.cre_start)  # audit outcomes move it
        self.area_blocks = {h: (Header.decode(hd), Certificate.from_dict(json.loads(c)))
                            for h, hd, c in self.conn.execute("SELECT height, header, cert FROM area_blocks")}
        self.rtts: dict[str, deque] = {n.name: deque(maxlen=RTT_WINDOW) for n in self.genesis.nodes}
        self.cp: dict[str, int] = {}
        self.load: Counter[str] = Counter()
        for (nodes,) in self.conn.execute("SELECT nodes FROM p_placed"):
            self.load.update(json.loads(nodes))
        row = self.conn.execute("SELECT full, dead FROM p_roles").fetchone()
        # Roles as the queued records leave them (the P chain's state once they are certified).
        self.roles = Roles(self.genesis.full) if row is None else Roles(*map(tuple, map(json.loads, row)))
        self.returning: set[str] = set()    # dead nodes that said they are alive again
        self.early: dict[int, list[StorageReceipt | ReceiptBatch]] = {}
        self.counts: Counter[str] = Counter()
        self.more = asyncio.Event()
        self.proposer: Proposer | None = None
        self._db = asyncio.Lock()
        self._client: aiomqtt.Client | None = None
        self._gaps: asyncio.Future | None = None   # fill_gaps under way
        self._gap_top = 0                           # the highest certificate seen: gaps below it are filled
        self.requester = Requester(self._publish_qos0, s.name, self.topics, timeout_s=s.timeout_s, window=2,
                                   retries=0)
        self.auditor: Auditor | None = None
        if s.r_database is not None:
            r = pchain_replica(pchain_id(s.area, s.r_chain, "R"), s.genesis, s.r_validators or s.validators,
                               s.r_database, self.area_validators, "R")
            if r.validators.proposer is None or r.validators.proposer.public_key != bls.SkToPk(self._sk):
                raise ConfigError(f"{s.proposer_key} is not the proposer key of the R chain's set")
            self.auditor = Auditor(r, self._sk, nodes={n.name: (n.kind, n.public_key) for n in self.genesis.nodes},
                                   cre=self.cre, ask=self.requester.ask, held=self.held, evidence=self.replace,
                                   dead=self.declare_dead, dead_missing=s.dead_missing,
                                   mean_s=s.audit_s, deadline_s=s.audit_deadline_s, late_s=s.audit_late_s,
                                   cre_floor=s.cre_floor, block_max=s.block_max, block_wait_s=s.block_wait_s,
                                   resend_s=s.resend_s)
            self.r_topics = Topics(r.chain)

    # -- RV ---------------------------------------------------------------------------
    def snapshot(self) -> list[Measure]:
        """The heavy and light nodes' terms now, by name."""
        s = self.settings
        return [Measure(n, self.cp.get(n, 1000), np_from_rtts(list(self.rtts[n]), s.np_ref_ms), self.cre[n],
                        self.load[n]) for n in self.roles.candidates(self.genesis)]

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
            await asyncio.gather(*(self._probe(n) for n in self.roles.candidates(self.genesis)),
                                 *(self._returned(n) for n in sorted(self.returning)))
            await asyncio.sleep(self.settings.probe_s)

    # -- area certificates -> placements -------------------------------------------------
    async def on_cert(self, payload: bytes) -> None:
        msg = decode_block(payload)
        await self.place_certified(msg.header, msg.cert)
        self._gap_top = max(self._gap_top, msg.header.height)
        if self._gaps is None or self._gaps.done():   # not awaited here: its answers arrive through `_read`
            self._gaps = asyncio.ensure_future(self._fill_gaps_below_top())

    async def _fill_gaps_below_top(self) -> None:
        checked = 0
        while self._gap_top > checked:   # certificates that came meanwhile move the top
            checked = self._gap_top
            await self.fill_gaps(checked)

    async def fill_gaps(self, height: int) -> int:
        """Place the certified area blocks below `height` that were never placed, their
        headers and certificates asked of a full node and checked like any other: a
        certificate the broker delivered just before a kill -9 is gone (paho acknowledges
        a QoS 1 message on receipt, before it is read), and nothing else would place it.
        The heights placed."""
        (count,) = self.conn.execute("SELECT COUNT(*) FROM p_placed WHERE height < ?", (height,)).fetchone()
        if count >= height - 1:
            return 0
        placed = {r[0] for r in self.conn.execute("SELECT height FROM p_placed WHERE height < ?", (height,))}
        gaps = [h for h in range(1, height) if h not in placed][:HEADERS_MAX]
        done = 0
        for node in self.roles.full:
            try:
                meta, _ = await self.requester.ask(node, "headers", lo=gaps[0], hi=gaps[-1])
            except StorageError as exc:
                event(log, "gap_fill_failed", logging.WARNING, node=node, reason=exc.reason)
                continue
            for item in meta.get("headers") if isinstance(meta.get("headers"), list) else []:
                try:
                    header, cert = Header.from_dict(item["header"]), Certificate.from_dict(item["cert"])
                    if header.height in gaps and await self.place_certified(header, cert):
                        done += 1
                except (ChainError, TypeError, KeyError) as exc:   # judged like any certificate: refused
                    reason = getattr(exc, "reason", "gap_bad_header")
                    self.counts[reason] += 1
                    event(log, "refused", logging.WARNING, topic="gap_fill", node=node, reason=reason)
            break
        self.counts["gaps_placed"] += done
        return done

    async def place_certified(self, header: Header, cert: Certificate | None) -> bool:
        """Place a certified area block (once); True if placed now."""
        if header.chain != self.settings.area or cert is None:
            raise ChainError("wrong_chain", header.chain)
        self.area_validators.check_certificate(cert, header)
        async with self._db:
            if self.conn.execute("SELECT 1 FROM p_placed WHERE height = ?", (header.height,)).fetchone():
                return False
            snap = self.snapshot()
            nodes = place(header.hash, self.roles.full, snap, self.genesis.replicas)
            with self.replica.store.transaction():
                self.conn.execute("INSERT INTO p_queue(id, tx, status, height) VALUES (?, ?, 'queued', NULL)",
                                  (f"placement/{header.height}", placement_tx(cert, nodes, snap)))
                self.conn.execute("INSERT OR IGNORE INTO area_blocks VALUES (?, ?, ?)",
                                  (header.height, header.encode(), cert.encode()))
                self.conn.execute("INSERT INTO p_placed VALUES (?, ?, ?, '[]', ?, 0, 0)",
                                  (header.height, header.hash, json.dumps(nodes), time.time()))
            self.area_blocks[header.height] = (header, cert)
            self.load.update(nodes)
        self.more.set()
        self.counts["placed"] += 1
        event(log, "placed", height=header.height, nodes=list(nodes),
              rv={m.node: round(m.cp * m.np * m.cre / 1e9 / (m.t + 1) ** 0.5, 4) for m in snap})
        await self._send(header.height, [n for n in nodes if n not in self.roles.full])
        for r in self.early.pop(header.height, []):
            await self._take_receipt(r, [header.height])
        return True

    async def _send(self, height: int, nodes: list[str]) -> None:
        if self._client is None:
            return
        for n in nodes:
            await self._client.publish(self.topics.store(n), encode_placement(heights=[height], by=self.settings.name),
                                       qos=1)

    # -- receipts ------------------------------------------------------------------------
    async def on_receipt(self, payload: bytes) -> None:
        """A single receipt or a receipt batch (one signature over several blocks)."""
        try:
            r = load_receipt(json.loads(payload))
        except (ValueError, UnicodeDecodeError):
            raise ChainError("receipt_schema", "not JSON") from None
        node = self.genesis.node(r.node)
        if r.chain != self.settings.area or node is None or self.roles.kind_of(self.genesis, r.node) != r.kind:
            raise ChainError("receipt_unknown_node", f"{r.node} ({r.kind}) of {r.chain}")
        single = isinstance(r, StorageReceipt)
        if not await asyncio.to_thread(verify_receipt if single else verify_receipts, r, node.public_key):
            raise ChainError("receipt_signature", f"not signed by {r.node}", height=r.height if single else None)
        await self._take_receipt(r)

    async def _take_receipt(self, r: StorageReceipt | ReceiptBatch, heights: Sequence[int] | None = None) -> None:
        """Queue the receipts of `r` (of a batch: of `heights`, default all) whose blocks are
        placed on its node and not receipted by it yet, as one record; hold the ones whose
        placement has not happened yet (a full node may beat the certificate here)."""
        hashes = {r.height: r.hash} if isinstance(r, StorageReceipt) else r.receipts()
        take = []
        async with self._db:
            for h in sorted(hashes if heights is None else heights):
                row = self.conn.execute("SELECT hash, nodes, receipted FROM p_placed WHERE height = ?",
                                        (h,)).fetchone()
                if row is None:
                    if len(self.early) < EARLY_MAX:
                        self.early.setdefault(h, []).append(r)
                    self.counts["receipt_early"] += 1
                elif row[0] != hashes[h] or r.node not in json.loads(row[1]):
                    self.counts["receipt_not_placed"] += 1
                elif r.node in json.loads(row[2]):
                    self.counts["receipt_duplicate"] += 1
                else:
                    take.append((h, json.loads(row[1]), json.loads(row[2])))
            if not take:
                return
            tx = receipt_tx(r) if isinstance(r, StorageReceipt) else receipts_tx(r, [h for h, _, _ in take])
            with self.replica.store.transaction():
                # Not unique per (height, node): a node whose receipt was dropped (it died) and
                # which is chosen again (readmitted, promoted) receipts the same block again.
                self.conn.execute("INSERT INTO p_queue(id, tx, status, height) VALUES (?, ?, 'queued', NULL)",
                                  (f"receipt/{take[0][0]}/{r.node}/{r.kind}/{time.time_ns()}", tx))
                for h, nodes, got in take:
                    self.conn.execute("UPDATE p_placed SET receipted = ?, complete = ? WHERE height = ?",
                                      (json.dumps(sorted(got + [r.node])), len(got) + 1 == len(nodes), h))
        self.counts["receipts"] += len(take)
        self.more.set()

    # -- audits and re-placement ------------------------------------------------------------
    def held(self, node: str) -> list[tuple[Header, Certificate]]:
        """The area blocks the certified P-chain state says `node` holds (it receipted them)."""
        trie = Trie(self.replica.store.nodes, bytes.fromhex(self.replica.state_root))
        out = []
        for h in sorted(self.area_blocks):
            raw = trie.get(block_key(h))
            if raw and node in decode_block_leaf(raw)["receipted"]:
                out.append(self.area_blocks[h])
        return out

    async def replace(self, node: str, heights: list[int] | None, evidence: int) -> None:
        """Move `node`'s replicas of `heights` (None: of every block placed on it) to the
        best free nodes by RV: `replace` records on the P chain, placements sent."""
        sends = []
        async with self._db:
            rows = self.conn.execute("SELECT height, hash, nodes, receipted FROM p_placed ORDER BY height").fetchall()
            for h, hh, nodes, got in rows:
                nodes, got = json.loads(nodes), json.loads(got)
                if node not in nodes or (heights is not None and h not in heights):
                    continue
                snap = self.snapshot()
                new = replacement(hh, nodes, snap)
                if new is None:
                    self.counts["replace_no_candidate"] += 1
                    continue
                nodes = [new if n == node else n for n in nodes]
                with self.replica.store.transaction():
                    self.conn.execute("INSERT OR IGNORE INTO p_queue(id, tx, status, height) VALUES (?, ?, 'queued', NULL)",
                                      (f"replace/{h}/{node}/{evidence}", replace_tx(h, hh, node, new, evidence, snap)))
                    self.conn.execute("UPDATE p_placed SET nodes = ?, receipted = ?, sent_at = ?, tries = 0, "
                                      "complete = 0 WHERE height = ?",
                                      (json.dumps(nodes), json.dumps([n for n in got if n != node]), time.time(), h))
                self.load[node] -= 1
                self.load[new] += 1
                self.counts["replaced"] += 1
                sends.append((h, new))
                event(log, "replaced", height=h, old=node, new=new, evidence=evidence)
        self.more.set()
        for h, new in sends:
            await self._send(h, [new] if new not in self.roles.full else [])

    # -- dead full nodes, promotion, readmission ---------------------------------------------
    def _save_roles(self, roles: Roles) -> None:
        """Inside the caller's transaction, beside the record that changes them."""
        self.conn.execute("INSERT OR REPLACE INTO p_roles(id, full, dead) VALUES (1, ?, ?)",
                          (json.dumps(list(roles.full)), json.dumps(list(roles.dead))))

    def _set_kind(self, node: str) -> None:
        if self.auditor is not None:
            self.auditor.nodes[node] = (self.roles.kind_of(self.genesis, node), self.auditor.nodes[node][1])

    async def on_liveness(self, node: str, payload: bytes) -> None:
        name, alive = parse_liveness(payload)
        if name != node or self.genesis.node(node) is None:
            raise ChainError("liveness_unknown_node", node)
        if not alive and node in self.roles.full:
            await self.declare_dead(node, via="last_will")
        elif alive and node in self.roles.dead and node not in self.returning:
            self.returning.add(node)
            event(log, "returning", node=node)
        elif alive and node not in self.roles.dead:
            # The role message goes out after the record commits: a verifier killed in
            # between leaves the node with its old kind (a promoted node receipting as
            # heavy, refused for ever). Its retained "alive" carries its kind: correct it.
            said, kind = json.loads(payload).get("kind"), self.roles.kind_of(self.genesis, node)
            if said and said != kind and self._client is not None:
                self.counts["role_resent"] += 1
                event(log, "role_resent", node=node, said=said, kind=kind)
                await self._client.publish(self.topics.store(node), encode_placement(role=kind, by=self.settings.name),
                                           qos=1)

    async def declare_dead(self, dead: str, r_height: int = 0, *, via: str = "missing") -> None:
        """A full node is dead (its last will, or the R-chain height of its missing audits):
        promote the best heavy node by RV in its place."""
        seen = int(time.time() * 1000)
        async with self._db:
            if dead not in self.roles.full:
                return
            snap = self.snapshot()
            new = promotion(dead, [m for m in snap if self.roles.kind_of(self.genesis, m.node) == "heavy"])
            event(log, "dead", logging.WARNING, node=dead, via=via, r_height=r_height, seen=seen, promote=new)
            if new is None:
                self.counts["promote_no_heavy"] += 1
                return
            sends = []
            with self.replica.store.transaction():
                self.conn.execute("INSERT INTO p_queue(id, tx, status, height) VALUES (?, ?, 'queued', NULL)",
                                  (f"promote/{dead}/{seen}",
                                   promote_tx(dead, new, via=via, r_height=r_height, seen=seen, snapshot=snap)))
                for h, hh, nodes, got in self.conn.execute(
                        "SELECT height, hash, nodes, receipted FROM p_placed ORDER BY height").fetchall():
                    nodes, got = json.loads(nodes), json.loads(got)
                    if dead not in nodes:
                        continue
                    nodes, got, taker = promote_block(hh, nodes, got, dead, new, snap)
                    self.load[dead] -= 1
                    if taker is not None:
                        self.load[taker] += 1
                        if taker != new:
                            sends.append((h, taker))
                    self.conn.execute("UPDATE p_placed SET nodes = ?, receipted = ?, sent_at = ?, tries = 0, "
                                      "complete = ? WHERE height = ?",
                                      (json.dumps(nodes), json.dumps(got), time.time(), set(got) >= set(nodes), h))
                self.roles = self.roles.promoted(dead, new)
                self._save_roles(self.roles)
            self._set_kind(new)
            self._set_kind(dead)
        if via == "missing":
            # Silent but perhaps still connected (hung, partitioned): no last will, and so no
            # "alive" when it recovers. Probe it like a returning node, to readmit it then.
            self.returning.add(dead)
        self.counts["promoted"] += 1
        event(log, "promoted", dead=dead, new=new, via=via, moved=len(sends))
        self.more.set()
        if self._client is not None:
            await self._client.publish(self.topics.store(new), encode_placement(role="full", by=self.settings.name),
                                       qos=1)
        for h, taker in sends:
            await self._send(h, [taker])

    async def _returned(self, node: str) -> None:
        """A dead node alive again: readmitted (as heavy) once it holds every certified header."""
        try:
            meta, _ = await self.requester.ask(node, "inventory")
        except StorageError:
            return
        top = max(self.area_blocks, default=0)
        if type(meta.get("height")) is not int or meta["height"] < top:
            return
        async with self._db:
            if node not in self.roles.dead:
                return
            with self.replica.store.transaction():
                self.conn.execute("INSERT INTO p_queue(id, tx, status, height) VALUES (?, ?, 'queued', NULL)",
                                  (f"readmit/{node}/{time.time_ns()}",
                                   readmit_tx(node, seen=int(time.time() * 1000), height=meta["height"])))
                self.roles = self.roles.readmitted(node)
                self._save_roles(self.roles)
            self._set_kind(node)
        self.returning.discard(node)
        self.more.set()
        self.counts["readmitted"] += 1
        kind = self.roles.kind_of(self.genesis, node)
        event(log, "readmitted", node=node, kind=kind, height=meta["height"])
        if self._client is not None:
            await self._client.publish(self.topics.store(node), encode_placement(role=kind, by=self.settings.name),
                                       qos=1)

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
        return self.proposer.prepare_queued("p_queue", self.settings.block_max, self.counts)

    async def _certified(self) -> None:
        async with self._db:
            self.proposer.certify_queued("p_queue")

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
                  self.p_topics.sync, self.topics.alive("+")]
        tasks = []
        if self.auditor is not None:
            topics += [self.r_topics.votes, self.r_topics.sync]

        async def serve(client: aiomqtt.Client) -> None:
            self._client = client

            async def publish(topic: str, payload: bytes) -> None:
                await client.publish(topic, payload, qos=1)

            if self.auditor is not None:
                tasks[:] = [self.auditor.propose(publish)] + [self.auditor.loop(n.name) for n in self.genesis.nodes]
            try:
                await until_stopped(stop, self._read(client), self._propose(client), self._probe_loop(),
                                    self._retry_loop(), *tasks)
            finally:
                self._client = None

        try:
            await keep_connected(self.cfg.mqtt, f"verifier-{s.area}-{s.name}", topics, stop, serve, log)
        finally:
            self.conn.close()
            audits = {}
            if self.auditor is not None:
                audits = {"r_chain": self.auditor.status(), "audits": dict(self.auditor.counts)}
                self.auditor.conn.close()
            event(log, "stop", height=self.replica.height, cre={n.name: self.cre[n.name] for n in self.genesis.nodes},
                  **audits, **self.counts)

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
                elif topic.endswith("/alive"):
                    await self.on_liveness(self.topics.node_of(topic) or "", payload)
                elif self.auditor is not None and topic in (self.r_topics.votes, self.r_topics.sync):
                    await _to_proposer(self.auditor.proposer, self.auditor.lock, topic == self.r_topics.votes,
                                       payload)
                else:
                    await _to_proposer(self.proposer, self._db, topic == self.p_topics.votes, payload)
            except ChainError as exc:
                self.counts[exc.reason] += 1
                event(log, "refused", logging.WARNING, topic=topic.rsplit("/", 1)[-1], reason=exc.reason,
                      detail=exc.detail[:200], height=exc.height)
            except aiomqtt.MqttError:
                raise   # the session is gone: keep_connected reconnects
            except Exception as exc:   # a bug on one message must not stop the verifier reading the rest
                self.counts["error_" + type(exc).__name__] += 1
                log.exception("message on %s failed", topic)
                event(log, "error", logging.ERROR, topic=topic.rsplit("/", 1)[-1], error=repr(exc)[:200])


async def _to_proposer(proposer: Proposer | None, lock: asyncio.Lock, vote: bool, payload: bytes) -> None:
    """A vote or a sync request for one of the verifier's chains (none before its proposer runs)."""
    if proposer is None:
        return
    if vote:
        proposer.on_vote(payload)
    else:
        async with lock:
            await proposer.on_sync(payload)
