"""The single writer of a chain: proposes each block, gathers 2f+1 votes, certifies.

One block is in flight at a time. The proposal is durable before it is sent,
and a restarted proposer re-proposes that very block (a validator that already
signed it signs the same bytes again; one that did not cannot be asked for a
different header at that height). A vote's chain, height and header hash are
checked as it arrives; its BLS signature is checked in the aggregate: once votes
from 2f+1 validators are in, their aggregate is verified once (one pairing check
instead of one per vote, and it is the certificate's own check). Only when that
fails is each vote verified alone, so a validator signing garbage or a different
header is counted and ignored, and certification needs only the fastest 2f+1
honest validators. A vote arriving after its block is certified is still
verified, so a faulty validator shows in the counts however slow it is.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from typing import Any, Awaitable, Callable, Sequence

from gridledger.logs import event

from . import bls
from .app import InvalidBlock
from .block import Certificate, ChainError, Header, Vote
from .net import SYNC_BATCH, Topics, decode_json, decode_vote, encode_block
from .replica import Replica
from .validators import proposal_message

__all__ = ["Proposer"]

log = logging.getLogger("gridledger.chain.proposer")

FOLLOWER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a follower's name is a topic level

Publish = Callable[[str, bytes], Awaitable[None]]

# A vote that comes after its block's certificate is verified (1.7 ms of BLS) at most
# once in this long per validator: enough for a validator signing garbage to show in
# the metrics, however slow it is, without a BLS check per block on the proposer's
# core (with four validators every block has a late fourth vote).
LATE_CHECK_S = 10.0


class Proposer:
    def __init__(self, replica: Replica, publish: Publish, secret_key: int, *, resend_s: float = 2.0,
                 commit_lock: asyncio.Lock | None = None):
        self.replica = replica
        self._sk = secret_key
        self._lock = commit_lock or asyncio.Lock()  # guards the replica's store across threads
        self.publish = publish
        self.resend_s = resend_s
        self.topics = Topics(replica.chain)
        self.counts: Counter[str] = Counter()
        self.last_latency_s: float | None = None
        self._want: Header | None = None
        self._last: Header | None = None  # the block just certified: late votes are still judged
        self._votes: dict[int, Vote] = {}   # verified, one per validator
        self._unchecked: list[Vote] = []   # for the wanted header, signature not yet checked
        self._ready = asyncio.Event()
        self._late_checked: dict[int, float] = {}  # validator -> when its last late vote was verified

    def pending(self) -> tuple[Header, list[bytes]] | None:
        """A proposal stored before a restart, to be certified before anything else."""
        return self.replica.store.proposal()

    def prepare(self, txs: Sequence[bytes], mark: Callable[[Header], None] | None = None, *,
                decoded: Sequence[Any] | None = None, kept: int | None = None) -> Header:
        """Build the next block and store it durably, with `mark(header)` in the same transaction
        (`decoded`: see `Replica.build`; `kept`: see `ChainStore.put_block`: `mark` is
        what makes the rest of the body readable from the app's tables)."""
        header = self.replica.build(txs, decoded=decoded)
        with self.replica.store.transaction():
            self.replica.store.put_block(header, list(txs), None, kept=kept)
            if mark is not None:
                mark(header)
        return header

    def prepare_queued(self, table: str, block_max: int, counts: Counter[str] | None = None
                       ) -> tuple[Header, list[bytes]] | None:
        """The next block of up to `block_max` records queued in `table` (columns seq, tx,
        status, height, in the replica's database), marked `proposed` in the block's own
        transaction; None when nothing is queued. Records are judged when they are
        queued, so the app refusing one here is a bug: that record is marked `refused`,
        counted in `counts` as `refused_REASON` and logged, and the block is built
        without it."""
        conn = self.replica.store.conn
        while True:
            rows = conn.execute(f"SELECT seq, tx FROM {table} WHERE status = 'queued' ORDER BY seq LIMIT ?",
                                (block_max,)).fetchall()
            if not rows:
                return None
            seqs, txs = [r[0] for r in rows], [r[1] for r in rows]

            def mark(header: Header) -> None:
                conn.executemany(f"UPDATE {table} SET status = 'proposed', height = ? WHERE seq = ?",
                                 [(header.height, q) for q in seqs])

            try:
                return self.prepare(txs, mark), txs
            except InvalidBlock as exc:
                if exc.index is None:
                    raise
                with self.replica.store.transaction():
                    conn.execute(f"UPDATE {table} SET status = 'refused' WHERE seq = ?", (seqs[exc.index],))
                if counts is not None:
                    counts["refused_" + exc.reason] += 1
                event(log, "record_refused", logging.ERROR, chain=self.replica.chain, reason=exc.reason,
                      detail=exc.detail)

    def certify_queued(self, table: str) -> list[tuple[str, int]]:
        """Mark the `proposed` records of `table` that the replica now holds certified as
        `certified`; their (id, height)."""
        conn = self.replica.store.conn
        rows = conn.execute(f"SELECT id, height FROM {table} WHERE status = 'proposed' AND height <= ?",
                            (self.replica.height,)).fetchall()
        if rows:
            with self.replica.store.transaction():
                conn.executemany(f"UPDATE {table} SET status = 'certified' WHERE id = ?", [(r[0],) for r in rows])
        return rows

    async def run(self, prepare: Callable[[], tuple[Header, list[bytes]] | None], more: asyncio.Event, *,
                  block_max: int, block_wait_s: float,
                  certified: Callable[[Header], Awaitable[None]] | None = None) -> None:
        """The single writer's loop: certify the proposal a restart left stored, then
        for ever build the next block with `prepare` (in a worker thread, under the
        commit lock; None: nothing to propose, so wait for `more` or a second),
        certify it and call `certified(header)`. After a block short of `block_max`,
        wait `block_wait_s` so the next one is fuller."""
        async with self._lock:
            pending = await asyncio.to_thread(self.pending)
        if pending is not None:
            event(log, "resume_proposal", height=pending[0].height, txs=len(pending[1]))
            await self.certify(*pending)
            if certified is not None:
                await certified(pending[0])
        while True:
            async with self._lock:
                block = await asyncio.to_thread(prepare)
            if block is None:
                more.clear()
                try:
                    await asyncio.wait_for(more.wait(), 1.0)
                except TimeoutError:
                    pass
                continue
            header, txs = block
            await self.certify(header, txs)
            event(log, "certified", logging.DEBUG, chain=header.chain, height=header.height, txs=header.txs,
                  latency_ms=round(self.last_latency_s * 1000, 1))
            if certified is not None:
                await certified(header)
            if header.txs < block_max:
                await asyncio.sleep(block_wait_s)

    async def certify(self, header: Header, txs: list[bytes]) -> Certificate:
        """Send the proposal (again every `resend_s`) until 2f+1 valid votes certify it."""
        self._want, self._votes, self._unchecked = header, {}, []
        self._ready.clear()
        payload = encode_block(header, txs, proposer_sig=bls.Sign(self._sk, proposal_message(header)))
        t0 = time.monotonic()
        wait = self.resend_s
        await self.publish(self.topics.proposals, payload)
        deadline = t0 + wait
        while True:
            try:
                await asyncio.wait_for(self._ready.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.counts["proposal_resent"] += 1
                event(log, "proposal_resent", logging.WARNING, height=header.height,
                      votes=sorted(self._votes), unchecked=sorted({v.validator for v in self._unchecked}))
                wait = min(wait * 2, 10.0)
                await self.publish(self.topics.proposals, payload)
                deadline = time.monotonic() + wait
                continue
            cert = self._certificate(header)
            if cert is not None:
                break  # else a bad vote was in the quorum: wait for more
        late, self._unchecked = self._unchecked, []
        self._want, self._last = None, header
        async with self._lock:
            await asyncio.to_thread(self.replica.commit, header, txs, cert, stored=True)
        self.last_latency_s = time.monotonic() - t0
        self.counts["certified"] += 1
        await self.publish(self.topics.certs, encode_block(header, cert=cert))
        for vote in late:  # in with the quorum but not needed for it: judged as late votes are
            self._judge_late(vote)
        return cert

    def on_vote(self, payload: bytes) -> None:
        try:
            vote = decode_vote(payload)
        except ChainError as exc:
            self.counts["vote_" + exc.reason] += 1
            return
        want = self._want or self._last
        if want is None or vote.chain != want.chain or vote.height != want.height:
            self.counts["vote_stale"] += 1
            return
        if vote.hash != want.hash:
            # Only a faulty validator (or a faulty proposer before a restart) gets here.
            self.counts["vote_conflicting_header"] += 1
            event(log, "conflicting_vote", logging.WARNING, height=vote.height, validator=vote.validator)
            return
        vset = self.replica.validators
        if not 0 <= vote.validator < vset.n:
            self._bad(vote)
            return
        if want is not self._want:
            self._judge_late(vote)
            return
        if vote.validator in self._votes:
            return  # this validator's vote is in and verified; a second copy adds nothing
        self._unchecked.append(vote)
        if len(self._votes.keys() | {v.validator for v in self._unchecked}) >= vset.quorum:
            self._ready.set()

    def _certificate(self, header: Header) -> Certificate | None:
        """The certificate from 2f+1 validators' votes, or None when a vote in it was bad.

        The quorum takes each validator's verified vote, else its first unchecked one,
        and its aggregate is verified once (remembered, so the commit that follows does
        not verify it again). If that fails, every unchecked vote is verified alone:
        the bad ones are counted and dropped, the good ones kept; the certificate is
        then made from verified votes only, or None until enough arrive."""
        vset = self.replica.validators
        chosen = dict(self._votes)
        for v in self._unchecked:
            chosen.setdefault(v.validator, v)
        picked = [chosen[i] for i in sorted(chosen)[:vset.quorum]]
        cert = vset.aggregate(picked)
        try:
            vset.check_certificate(cert, header, remember=True)
        except ChainError:
            pass
        else:
            used = {id(v) for v in picked}
            self._unchecked = [v for v in self._unchecked if id(v) not in used]
            return cert
        for v in self._unchecked:
            if v.validator in self._votes:
                continue
            if vset.check_vote(v):
                self._votes[v.validator] = v
            else:
                self._bad(v)
        self._unchecked = []
        self._ready.clear()
        if len(self._votes) < vset.quorum:
            return None
        cert = vset.aggregate(list(self._votes.values()))
        vset.check_certificate(cert, header, remember=True)  # each vote verified: cannot fail, remembered
        return cert

    def _judge_late(self, vote: Vote) -> None:
        now = time.monotonic()
        last = self._late_checked.get(vote.validator)
        if last is not None and now - last < LATE_CHECK_S:
            self.counts["vote_late_unverified"] += 1
            return
        self._late_checked[vote.validator] = now
        if self.replica.validators.check_vote(vote):
            self.counts["vote_late"] += 1  # valid, but the block is already certified
        else:
            self._bad(vote)

    def _bad(self, vote: Vote) -> None:
        self.counts["vote_bad_signature"] += 1
        event(log, "bad_vote", logging.WARNING, height=vote.height, validator=vote.validator)

    async def on_sync(self, payload: bytes) -> None:
        """Serve certified blocks to a validator (by index) or a follower (by name) that fell behind."""
        try:
            req = decode_json(payload)
            who, start = req["validator"], req["from"]
            if type(start) is not int or start < 1 or not (
                    type(who) is int or (isinstance(who, str) and FOLLOWER_RE.fullmatch(who))):
                raise ValueError
        except (ChainError, KeyError, TypeError, ValueError):
            self.counts["sync_malformed"] += 1
            return
        for h in range(start, min(start + SYNC_BATCH, self.replica.height + 1)):
            raw = self.replica.store.raw_block(h)
            if raw is None or raw[1] is None:
                break
            header, cert = Header.decode(raw[0]), Certificate.from_dict(decode_json(raw[1]))
            await self.publish(self.topics.blocks(who), encode_block(header, raw[2], cert))
        self.counts["sync_served"] += 1
