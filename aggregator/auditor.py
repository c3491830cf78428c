"""Audits: the verifier's unpredictable challenges to storage nodes, and the R chain it proposes.

Each node is asked at exponential inter-arrival times (mean `audit_s`, drawn with
`secrets`), about a block the certified P-chain state says it holds (receipted),
a random transaction of it and a fresh 16-byte nonce. The answer is judged by
`receipts.audit_outcome` against the certified area header: `ok`, `wrong` (the
node's signed answer with data or path that does not verify), `late` (right, but
after `audit_deadline_s`) or `missing` (nothing within deadline + `audit_late_s`,
a refusal, or an answer that is not the node's to this question). Each result is
one R-chain record, with the node's CRE after it (`cre_after`). A certified
`wrong` (or `missing` because the node said its copy is `corrupt`), or a heavy or
light node's CRE below `cre_floor`, makes the verifier
re-place that block (or all the node's blocks) with P-chain `replace` records
naming the R-chain height as evidence.

The queue (`r_queue`) shares the R chain's SQLite file, as `p_queue` the P chain's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections import Counter
from typing import Awaitable, Callable, Sequence

from certlog.block import Certificate, ChainError, Header
from certlog.proposer import Proposer
from certlog.replica import Replica
from gridledger.logs import event

from .rchainapp import audit_tx
from .receipts import AuditAnswer, audit_outcome
from .reliability import Credibility
from .storagewire import StorageError

__all__ = ["next_gap", "Question", "ask_question", "judge", "Auditor"]

log = logging.getLogger("gridledger.verifier.audit")


def next_gap(mean_s: float, u: float | None = None) -> float:
    """Seconds to the next audit of a node: exponential with mean `mean_s` (memoryless,
    so a node cannot tell when it is safe to misbehave). `u` in [0, 1) for tests."""
    if u is None:
        u = secrets.randbits(53) / (1 << 53)
    return -mean_s * math.log1p(-u)


class Question:
    __slots__ = ("node", "header", "cert", "index", "nonce")

    def __init__(self, node: str, header: Header, cert: Certificate, index: int, nonce: str):
        self.node, self.header, self.cert, self.index, self.nonce = node, header, cert, index, nonce


def ask_question(node: str, held: Sequence[tuple[Header, Certificate]]) -> Question | None:
    """A random block of those `node` holds, a random transaction, a fresh nonce."""
    if not held:
        return None
    header, cert = held[secrets.randbelow(len(held))]
    return Question(node, header, cert, secrets.randbelow(header.txs), secrets.token_hex(16))


def judge(q: Question, meta: dict | None, elapsed_s: float, deadline_s: float,
          public_key: bytes) -> tuple[str, AuditAnswer | None, str]:
    """(outcome, the answer to record, why) from the node's response `meta` (None: no
    answer or a refusal) `elapsed_s` after asking. A wrong answer is wrong however late."""
    if meta is None:
        return "missing", None, "no_answer"
    try:
        answer = AuditAnswer.from_dict(meta.get("answer"))
        outcome = audit_outcome(answer, q.header, nonce=q.nonce, index=q.index, node=q.node,
                                public_key=public_key)
    except ChainError as exc:
        return "missing", None, exc.reason   # not the node's answer to this question: proves nothing
    if outcome == "ok" and elapsed_s > deadline_s:
        return "late", None, "after_deadline"
    return outcome, answer, outcome


Ask = Callable[..., Awaitable[tuple[dict, bytes]]]
Publish = Callable[[str, bytes], Awaitable[None]]


class Auditor:
    """Audit loops per node, the R-chain queue and its proposer. `held(node)` lists
    the certified blocks the node holds per the certified P chain; `evidence(node,
    heights | None, r_height)` asks the verifier to re-place (None: every block)."""

    def __init__(self, replica: Replica, secret_key: int, *, nodes: dict[str, tuple[str, bytes]],
                 cre: Credibility, ask: Ask, held: Callable[[str], list], evidence: Callable,
                 dead: Callable | None = None, dead_missing: int = 3,
                 mean_s: float, deadline_s: float, late_s: float, cre_floor: int, block_max: int = 500,
                 block_wait_s: float = 0.2, resend_s: float = 2.0):
        self.replica, self._sk = replica, secret_key
        self.nodes = nodes                      # name -> (kind, BLS public key)
        self.cre, self.ask, self.held, self.evidence = cre, ask, held, evidence
        self.dead, self.dead_missing = dead, dead_missing   # a full node silent this many audits in a row
        self.silent: Counter[str] = Counter()               # consecutive missing outcomes per node
        self.mean_s, self.deadline_s, self.late_s, self.cre_floor = mean_s, deadline_s, late_s, cre_floor
        self.block_max, self.block_wait_s, self.resend_s = block_max, block_wait_s, resend_s
        self.conn = replica.store.conn
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS r_queue (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tx BLOB NOT NULL,
                status TEXT NOT NULL, height INTEGER, node TEXT NOT NULL, outcome TEXT NOT NULL,
                cre INTEGER NOT NULL, action TEXT NOT NULL, area_height INTEGER NOT NULL,
                acted INTEGER NOT NULL DEFAULT 0);""")
        for node, cre in self.conn.execute("SELECT node, cre FROM r_queue WHERE status != 'refused' ORDER BY seq"):
            self.cre.adjust(node, cre - self.cre[node])   # CRE as the queued records left it
        self.counts: Counter[str] = Counter()
        self.more = asyncio.Event()
        self.lock = asyncio.Lock()
        self.proposer: Proposer | None = None

    # -- audits ---------------------------------------------------------------------
    async def loop(self, node: str) -> None:
        while True:
            await asyncio.sleep(next_gap(self.mean_s))
            try:
                await self.audit(node)
            except (ChainError, StorageError) as exc:   # one failed audit must not end the node's loop
                self.counts["audit_" + exc.reason] += 1
                event(log, "audit_error", logging.WARNING, node=node, reason=exc.reason, detail=exc.detail[:200])

    async def audit(self, node: str) -> str | None:
        """Ask `node` one question and queue the result; the outcome (None: nothing to ask)."""
        q = ask_question(node, self.held(node))
        if q is None:
            return None
        asked, t0 = int(time.time() * 1000), time.monotonic()
        try:
            meta, _ = await self.ask(node, "audit", timeout_s=self.deadline_s + self.late_s,
                                     height=q.header.height, index=q.index, nonce=q.nonce)
        except StorageError as exc:
            meta, why = None, exc.reason
        else:
            why = ""
        kind, pk = self.nodes[node]
        outcome, answer, reason = await asyncio.to_thread(judge, q, meta, time.monotonic() - t0,
                                                          self.deadline_s, pk)
        at = max(int(time.time() * 1000), asked)
        # A node saying its copy is corrupt (its store's CRC or leaf check failed) has lost
        # the block as surely as one answering wrong: `missing` (nothing signed proves it),
        # and the block re-placed as after `wrong`.
        await self.record(q, outcome, answer, asked, at, kind, lost=why == "corrupt")
        self.counts[f"audit_{outcome}"] += 1
        event(log, "audit", node=node, height=q.header.height, index=q.index, outcome=outcome,
              reason=why or reason, cre=self.cre[node], ms=at - asked)
        return outcome

    async def record(self, q: Question, outcome: str, answer: AuditAnswer | None, asked: int, at: int,
                     kind: str, *, lost: bool = False) -> None:
        async with self.lock:
            cre = self.cre.record(q.node, outcome)
            action = "block" if outcome == "wrong" or lost else ""
            self.silent[q.node] = self.silent[q.node] + 1 if outcome == "missing" else 0
            if cre < self.cre_floor and kind != "full":    # a full node is replaced whole, by promotion
                action = "all"
            if kind == "full" and self.silent[q.node] >= self.dead_missing:
                action = "dead"
            tx = audit_tx(node=q.node, header=q.header, cert=q.cert, index=q.index, nonce=q.nonce, outcome=outcome,
                          answer=answer, asked=asked, at=at, cre=cre)
            with self.replica.store.transaction():
                self.conn.execute("INSERT INTO r_queue(id, tx, status, height, node, outcome, cre, action, area_height)"
                                  " VALUES (?, ?, 'queued', NULL, ?, ?, ?, ?, ?)",
                                  (f"audit/{q.nonce}", tx, q.node, outcome, cre, action, q.header.height))
        self.more.set()

    # -- the R chain -------------------------------------------------------------------
    async def propose(self, publish: Publish) -> None:
        self.proposer = Proposer(self.replica, publish, self._sk, resend_s=self.resend_s, commit_lock=self.lock)
        await self._certified()

        async def certified(header: Header) -> None:
            await self._certified()

        await self.proposer.run(self._prepare, self.more, block_max=self.block_max,
                                block_wait_s=self.block_wait_s, certified=certified)

    def _prepare(self) -> tuple[Header, list[bytes]] | None:
        return self.proposer.prepare_queued("r_queue", self.block_max, self.counts)

    async def _certified(self) -> None:
        """Mark certified records; hand each certified one with an action to the verifier."""
        async with self.lock:
            self.proposer.certify_queued("r_queue")
            todo = self.conn.execute("SELECT seq, node, action, area_height, height FROM r_queue WHERE "
                                     "status = 'certified' AND action != '' AND acted = 0 ORDER BY seq").fetchall()
        for seq, node, action, area_height, r_height in todo:
            if action == "dead":
                if self.dead is not None:
                    await self.dead(node, r_height)
            else:
                await self.evidence(node, [area_height] if action == "block" else None, r_height)
            async with self.lock:
                with self.replica.store.transaction():
                    self.conn.execute("UPDATE r_queue SET acted = 1 WHERE seq = ?", (seq,))

    def status(self) -> dict:
        rows = self.conn.execute("SELECT status, COUNT(*) FROM r_queue GROUP BY status").fetchall()
        return {"height": self.replica.height, **{s: n for s, n in rows}}


def load_held(rows: Sequence[tuple[int, bytes, bytes]]) -> list[tuple[Header, Certificate]]:
    """(height, header, cert) rows of the verifier's `area_blocks` as objects."""
    return [(Header.decode(h), Certificate.from_dict(json.loads(c))) for _, h, c in rows]
