"""Catch-up from peers (seed 000's DRS): ask their inventories, fetch what this node
lacks from all the peers that hold it in parallel, keep only what matches a
certified header.

`Requester` is the request/response layer over MQTT: ids, a bounded window of
outstanding requests per peer, time-outs and retries. `CatchUp` runs one round:
headers first (each certificate checked), then bodies, spread over every peer
holding them (so over at least f+1 sources when that many hold it): small bodies
several to a response (`bodies`, a batch per peer kept in one commit), a body
larger than a chunk in chunks. A peer that serves a body not matching the
certified header is named, counted and skipped for that body, which is fetched
from the next holder.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable, Collection, Protocol, Sequence

from certlog.block import Certificate, ChainError, Header
from gridledger.logs import event

from .admission import AdmittedBody, admit_body
from .sampler import Stages
from .storagewire import (BODIES_MAX, HEADERS_MAX, Reassembly, StorageError, StorageTopics, decode_body,
                          encode_request, parse_response, split_bodies)

__all__ = ["Requester", "Inventory", "CatchUp", "assign", "Keeper"]

log = logging.getLogger("gridledger.storage.catchup")

INVENTORY_PAGES = 64
# A peer that serves a wrong body or malformed chunks is skipped for that body;
# these reasons say the data was wrong (a time-out only says the peer was slow).
BAD_DATA = {"tx_root_mismatch", "tx_count_mismatch", "body_format", "bad_chunk", "bad_response"}

RETRY = {"peer_timeout", "busy"}  # worth asking the same peer again

# Heights asked of one peer per batch: about one 256 KiB response of area-chain
# bodies (~20 KB each). Smaller batches put more requests in flight at once (up to
# `parallel` batches); a fill of 200 such bodies from two peers over Mosquitto took
# 0.37 s in batches of 32 and 0.27 s in batches of 12 (one comparison, unloaded).
BATCH = min(12, BODIES_MAX)
# A batch has one request in flight at a time, so a peer holding few heights gets
# them in up to `window` batches (one request each in flight, as its window allows):
# large bodies (one to a response) would otherwise come one round trip after another.
# Batches running at once, over all peers: 32 x 256 KiB = 8 MiB of responses in flight at most.
PARALLEL = 32

Publish = Callable[[str, bytes], Awaitable[None]]


class Requester:
    """Requests to peers and their responses, matched by id (random per process, so
    a response cannot be forged without seeing the request)."""

    def __init__(self, publish: Publish, me: str, topics: StorageTopics, *, timeout_s: float = 3.0,
                 window: int = 4, retries: int = 2, stages: Stages | None = None):
        self.publish, self.me, self.topics = publish, me, topics
        self.timeout_s, self.window, self.retries = timeout_s, window, retries
        self.counts: Counter[str] = Counter()
        self._prefix = secrets.token_hex(4)
        self._next = 0
        self._pending: dict[str, asyncio.Future] = {}
        self._windows: dict[str, asyncio.Semaphore] = {}
        self.stages = stages or Stages()

    def on_response(self, payload: bytes) -> None:
        try:
            with self.stages("parse"):
                meta, data = parse_response(payload)
        except StorageError as exc:
            self.counts[f"response_{exc.reason}"] += 1
            return
        fut = self._pending.get(meta["id"])
        if fut is None or fut.done():
            self.counts["response_unexpected"] += 1  # late (timed out) or not ours
            return
        fut.set_result((meta, data))

    async def ask(self, peer: str, op: str, *, timeout_s: float | None = None, **args) -> tuple[dict, bytes]:
        """The peer's answer, retried on time-out; `StorageError` with the peer's own
        reason if it refuses, or `peer_timeout`. `timeout_s` overrides the default."""
        for attempt in range(self.retries + 1):
            try:
                return await self._once(peer, op, args, timeout_s or self.timeout_s)
            except StorageError as exc:
                if exc.reason not in RETRY or attempt == self.retries:
                    raise
                self.counts["retried"] += 1
                if exc.reason == "busy":
                    await asyncio.sleep(self.timeout_s / 4 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _once(self, peer: str, op: str, args: dict, timeout_s: float) -> tuple[dict, bytes]:
        window = self._windows.setdefault(peer, asyncio.Semaphore(self.window))
        async with window:
            self._next += 1
            rid = f"{self._prefix}-{self._next}"
            fut = asyncio.get_running_loop().create_future()
            self._pending[rid] = fut
            try:
                await self.publish(self.topics.requests(peer), encode_request(rid, self.me, op, **args))
                meta, data = await asyncio.wait_for(fut, timeout_s)
            except TimeoutError:
                self.counts["timeout"] += 1
                raise StorageError("peer_timeout", f"{peer} did not answer {op} in {timeout_s} s") from None
            finally:
                self._pending.pop(rid, None)
        if meta.get("ok") is not True:
            reason = meta.get("error")
            raise StorageError(reason if isinstance(reason, str) and len(reason) <= 64 else "bad_response",
                               f"{peer}: {str(meta.get('detail', ''))[:120]}")
        return meta, data


@dataclass(frozen=True, slots=True)
class Inventory:
    peer: str
    height: int                      # the peer's highest certified header
    bodies: tuple[tuple[int, int], ...]  # inclusive ranges of the bodies it holds

    def holds(self, height: int) -> bool:
        return any(lo <= height <= hi for lo, hi in self.bodies)

    @classmethod
    def from_pages(cls, peer: str, pages: Sequence[dict]) -> "Inventory":
        ranges = []
        for meta in pages:
            for r in meta.get("bodies", []):
                if (not isinstance(r, list) or len(r) != 2 or not all(type(x) is int for x in r)
                        or not 1 <= r[0] <= r[1]):
                    raise StorageError("bad_response", f"{peer}: inventory range {str(r)[:40]}")
                ranges.append((r[0], r[1]))
        height = pages[0].get("height") if pages else 0
        if type(height) is not int or height < 0:
            raise StorageError("bad_response", f"{peer}: inventory height")
        return cls(peer, height, tuple(ranges))


def assign(wanted: Sequence[int], inventories: Sequence[Inventory],
           demoted: Collection[str] = ()) -> dict[int, list[str]]:
    """For each wanted height, the peers holding it in the order to try them. The
    first choice rotates over the holders, so the work (and the trust) is spread
    over every peer that holds the data; peers in `demoted` (they served wrong
    data before) come last; a height no peer holds is left out."""
    out: dict[int, list[str]] = {}
    for k, h in enumerate(wanted):
        holders = [inv.peer for inv in inventories if inv.holds(h)]
        if holders:
            r = k % len(holders)
            order = holders[r:] + holders[:r]
            out[h] = [p for p in order if p not in demoted] + [p for p in order if p in demoted]
    return out


class Keeper(Protocol):
    """What catch-up needs from the node: its store (read) and its admission (write)."""
    kind: str

    async def header(self, height: int) -> tuple[Header, Certificate] | None: ...
    async def missing_headers(self, upto: int) -> list[int]: ...
    async def wanted(self) -> list[int]: ...
    async def lacking(self, heights: Sequence[int]) -> dict[int, Header]: ...
    async def keep_header(self, header: Header, cert: Certificate, source: str) -> None: ...
    async def keep_bodies(self, bodies: list[AdmittedBody], source: str) -> list[int]: ...


class CatchUp:
    def __init__(self, keeper: Keeper, requester: Requester, peers: Sequence[str], *, chunk_size: int,
                 parallel: int = PARALLEL, inventory_s: float = 0.0):
        self.keeper, self.req = keeper, requester
        self.stages = requester.stages
        self.peers = list(peers)
        self.chunk_size = chunk_size
        self.parallel = parallel
        # A peer's inventory younger than this is reused instead of asked again: rounds
        # that follow each other while there is work (a fill) then start fetching at
        # once. A stale inventory costs nothing wrong: a body the peer no longer has
        # comes back `missing` and is fetched from the next holder; one it has gained
        # is seen by the next round that asks.
        self.inventory_s = inventory_s
        self._inventories: dict[str, tuple[float, Inventory]] = {}
        self.counts: Counter[str] = Counter()
        self.bad_peers: Counter[str] = Counter()   # wrong data served, by peer
        self.down: set[str] = set()                 # peers whose last will says they are gone: not asked

    async def round(self) -> dict:
        """One round; returns what it did (for the log and the tests), with the
        seconds each phase took (inventories, headers, bodies)."""
        t0 = time.monotonic()
        # A dead peer would hold the round up for its time-outs: skip the ones known down.
        live = [p for p in self.peers if p not in self.down]
        invs, reused = await self._inventories_of(live, t0)
        t1 = time.monotonic()
        headers = await self._headers(invs)
        t2 = time.monotonic()
        wanted = await self.keeper.wanted()
        plan = assign(wanted, invs, demoted=set(self.bad_peers))
        # Bodies no reused inventory lists (blocks newer than it): ask the inventories
        # again while the planned bodies are being fetched, then fetch those too.
        fresh = (asyncio.ensure_future(self._inventories_of(live, t0, reuse=False))
                 if reused and len(plan) < len(wanted) else None)
        done = await self._fetch(plan)
        if fresh is not None:
            invs, _ = await fresh
            done += await self._fetch(assign([h for h in wanted if h not in plan], invs, demoted=set(self.bad_peers)))
        got = Counter(peer for kept in done for peer in kept.values())
        return {"peers": len(invs), "headers": headers, "wanted": len(wanted), "fetched": sum(got.values()),
                "sources": len(got), "by_source": dict(got),
                "phases_s": [round(t1 - t0, 4), round(t2 - t1, 4), round(time.monotonic() - t2, 4)]}

    async def _fetch(self, plan: dict[int, list[str]]) -> list[dict[int, str]]:
        gate = asyncio.Semaphore(self.parallel)
        batches = _batches(plan, BATCH, self.req.window)
        return list(await asyncio.gather(*(self._batch(peer, hs, plan, gate) for peer, hs in batches)))

    async def _inventories_of(self, peers: list[str], now: float, *,
                              reuse: bool = True) -> tuple[list[Inventory], bool]:
        """The peers' inventories (those that answered), and whether any was reused."""
        got = await asyncio.gather(*(self._recent_inventory(p, now, reuse) for p in peers))
        return [inv for inv, _ in got if inv is not None], any(old for _, old in got)

    async def _recent_inventory(self, peer: str, now: float, reuse: bool) -> tuple[Inventory | None, bool]:
        held = self._inventories.get(peer)
        if reuse and held is not None and now - held[0] < self.inventory_s:
            return held[1], True
        inv = await self._inventory(peer)
        if inv is None:
            self._inventories.pop(peer, None)
        else:
            self._inventories[peer] = (time.monotonic(), inv)
        return inv, False

    async def _inventory(self, peer: str) -> Inventory | None:
        pages, after = [], 0
        try:
            for _ in range(INVENTORY_PAGES):
                meta, _ = await self.req.ask(peer, "inventory", after=after)
                pages.append(meta)
                if not meta.get("more") or not meta.get("bodies"):
                    break
                after = meta["bodies"][-1][1]
            return Inventory.from_pages(peer, pages)
        except (StorageError, TypeError, IndexError, KeyError) as exc:
            self._refused(peer, getattr(exc, "reason", "bad_response"), str(exc))
            return None

    async def _headers(self, invs: Sequence[Inventory]) -> int:
        top = max((i.height for i in invs), default=0)
        missing = await self.keeper.missing_headers(top)
        runs = _runs(missing, HEADERS_MAX)
        jobs = []
        for k, (lo, hi) in enumerate(runs):
            holders = [i.peer for i in invs if i.height >= hi]
            if holders:
                jobs.append(self._header_run(holders[k % len(holders)], lo, hi))
        return sum(await asyncio.gather(*jobs))

    async def _header_run(self, peer: str, lo: int, hi: int) -> int:
        kept = 0
        try:
            meta, _ = await self.req.ask(peer, "headers", lo=lo, hi=hi)
            items = meta.get("headers")
            if not isinstance(items, list):
                raise StorageError("bad_response", f"{peer}: headers")
            for item in items:
                header = Header.from_dict(item.get("header") if isinstance(item, dict) else None)
                cert = Certificate.from_dict(item.get("cert"))
                if not lo <= header.height <= hi:
                    raise StorageError("bad_response", f"{peer}: header {header.height} outside {lo}..{hi}")
                await self.keeper.keep_header(header, cert, peer)
                kept += 1
        except ChainError as exc:
            self._refused(peer, exc.reason, exc.detail, bad=exc.reason not in ("peer_timeout",))
        return kept

    async def _batch(self, peer: str, heights: list[int], plan: dict[int, list[str]],
                     gate: asyncio.Semaphore) -> dict[int, str]:
        """Bodies of `heights` (first choice: `peer`) several to a response, each batch
        kept in one commit; what `peer` lacks, serves wrong or does not answer is then
        fetched one by one from the next holders. Height -> the peer it came from."""
        kept: dict[int, str] = {}
        later: dict[int, list[str]] = {}   # height -> the holders still to try
        async with gate:
            headers = await self.keeper.lacking(heights)  # arrived by another path meanwhile: not fetched
            want = [h for h in heights if h in headers]
            ask = lambda want: asyncio.ensure_future(self.req.ask(  # noqa: E731
                peer, "bodies", want=[[h, headers[h].hash] for h in want], chunk_size=self.chunk_size))
            pending = ask(want) if want else None
            try:
                while pending is not None:
                    meta, data = await pending
                    pending = None
                    with self.stages("split"):
                        got = split_bodies(meta.get("bodies"), data, want)
                    missing, large = (_listed(meta, k, want) for k in ("missing", "large"))
                    answered = {h for h, _ in got} | missing | large
                    if want[0] not in answered:
                        raise StorageError("bad_response", f"{peer}: bodies answered none of the first")
                    # Ask for the rest now: the peer prepares it while this part is checked and kept.
                    want = [h for h in want if h not in answered]
                    pending = ask(want) if want else None
                    good = []
                    for h, raw in got:
                        try:
                            with self.stages("decode"):
                                txs = decode_body(raw, views=True)
                            with self.stages("admit"):   # the Merkle root against the certified header
                                good.append(admit_body(headers[h], txs, raw))
                        except ChainError as exc:
                            self._refused(peer, exc.reason, exc.detail, height=h, bad=exc.reason in BAD_DATA)
                            later[h] = _others(plan[h], peer)
                    later.update({h: plan[h] for h in large})          # chunked, this peer first
                    later.update({h: _others(plan[h], peer) for h in missing})
                    kept.update(dict.fromkeys(await self.keeper.keep_bodies(good, peer), peer) if good else {})
            except ChainError as exc:
                self._refused(peer, exc.reason, exc.detail, bad=exc.reason in BAD_DATA)
                later.update({h: _others(plan[h], peer) for h in headers if h not in kept and h not in later})
            finally:
                if pending is not None:
                    pending.cancel()
            ones = await asyncio.gather(*(self._body(headers[h], peers) for h, peers in later.items()))
        kept.update({h: src for h, src in zip(later, ones) if src is not None})
        return kept

    async def _body(self, header: Header, peers: list[str]) -> str | None:
        """Fetch and keep one body (in chunks) from the first of `peers` that serves it right."""
        for peer in peers:
            try:
                raw = await self._download(peer, header)
                body = admit_body(header, decode_body(raw, views=True), raw)
            except ChainError as exc:
                self._refused(peer, exc.reason, exc.detail, height=header.height, bad=exc.reason in BAD_DATA)
                continue
            return peer if await self.keeper.keep_bodies([body], peer) else None
        return None

    async def _download(self, peer: str, header: Header) -> bytes:
        ask = lambda chunk: self.req.ask(peer, "body", height=header.height, hash=header.hash,  # noqa: E731
                                         chunk=chunk, chunk_size=self.chunk_size)
        meta, data = await ask(0)
        try:
            body = Reassembly(meta["size"], self.chunk_size)
        except KeyError:
            raise StorageError("bad_response", "no size") from None
        body.add(0, data)

        async def fetch(i: int) -> None:
            m, d = await ask(i)
            if m.get("chunk") != i:
                raise StorageError("bad_chunk", f"asked chunk {i}, got {m.get('chunk')!r}")
            body.add(i, d)

        # All at once: the peer's window bounds how many are in flight.
        results = await asyncio.gather(*(fetch(i) for i in body.missing()), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return body.data()

    def _refused(self, peer: str, reason: str, detail: str, *, height: int | None = None, bad: bool = False) -> None:
        self.counts[reason] += 1
        if bad:
            self.bad_peers[peer] += 1
        event(log, "refused", logging.WARNING, peer=peer, reason=reason, detail=detail[:200], height=height,
              bad_data=bad)


def _batches(plan: dict[int, list[str]], most: int, per_peer: int = 1) -> list[tuple[str, list[int]]]:
    """The planned heights grouped by their first choice, in batches of at most `most`,
    and at least `per_peer` batches for a peer with that many heights (as even as can be)."""
    by_peer: dict[str, list[int]] = {}
    for h, peers in plan.items():
        by_peer.setdefault(peers[0], []).append(h)
    out = []
    for p, hs in by_peer.items():
        k = max(-(-len(hs) // most), min(len(hs), per_peer))
        out += [(p, hs[i * len(hs) // k:(i + 1) * len(hs) // k]) for i in range(k)]
    return out


def _listed(meta: dict, key: str, asked: Collection[int]) -> set[int]:
    hs = meta.get(key, [])
    if not isinstance(hs, list) or not all(h in asked for h in hs):
        raise StorageError("bad_response", f"{key} must list asked heights")
    return set(hs)


def _others(peers: list[str], peer: str) -> list[str]:
    return [p for p in peers if p != peer]


def _runs(heights: Sequence[int], most: int) -> list[tuple[int, int]]:
    """Consecutive heights as inclusive runs of at most `most`."""
    runs: list[tuple[int, int]] = []
    for h in heights:
        if runs and h == runs[-1][1] + 1 and h - runs[-1][0] < most:
            runs[-1] = (runs[-1][0], h)
        else:
            runs.append((h, h))
    return runs
