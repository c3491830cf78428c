"""Meter signatures checked as readings stream in, before a proposal carries them.

A validator subscribes to its area's reading topic and, on idle time, verifies
each well-formed reading of a registered meter. A signature that verifies goes
into `VerifiedSignatures`, keyed by everything the check depended on: the
meter's public key, the reading hash (SHA-256 of the signed bytes) and the
signature. When a block is checked, `AreaApp` skips the Ed25519 verify of a
reading found there and runs every other check as before; a miss verifies.

The stream is never trusted for anything else: a message on it is not a vote,
changes no state, and a bad one is dropped and counted. The work is moved, not
removed: each signature is still verified once by each validator.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from gridledger.errors import ConfigError, Rejected
from gridledger.logs import event
from gridledger.wire import MAX_PAYLOAD, parse_reading

from .registry import Registry

__all__ = ["PreverifyConfig", "VerifiedSignatures", "Preverifier", "signature_key", "readings_filter"]

log = logging.getLogger("gridledger.validator.preverify")

STATUS_EVERY_S = 30.0  # a "preverify" summary at most this often, when something changed
IDLE_POLL_S = 0.001    # while the chain side is busy, look again this often


@dataclass(frozen=True, slots=True, kw_only=True)
class PreverifyConfig:
    """The `[preverify]` table of a validator's config."""
    enabled: bool = True
    cache: int = 200_000    # verified signatures kept (about 115 bytes each: 23 MB)
    queue: int = 5_000      # stream readings waiting; beyond it the oldest is dropped (`queue_full`)
    max_age_s: float = 10.0  # a reading waiting longer is dropped (`stale`): its block has likely been checked
    slice_ms: float = 2.0   # work this long, then yield; a proposal waits at most about this

    def __post_init__(self) -> None:
        if self.cache < 1 or self.queue < 1 or self.max_age_s <= 0 or self.slice_ms <= 0:
            raise ConfigError("[preverify]: cache and queue >= 1, max_age_s and slice_ms > 0")


def signature_key(public_key: str, reading_hash: str, sig: str) -> bytes:
    """What a verified signature is remembered by. All three are fixed-length hex
    (64, 64, 128 digits), so the concatenation is unambiguous; the full SHA-256 keeps
    a forged triple from colliding with a verified one."""
    return hashlib.sha256(f"{public_key}{reading_hash}{sig}".encode()).digest()


def readings_filter(area: str) -> str:
    return f"gl/v1/{area}/meters/+/readings"


class VerifiedSignatures:
    """A bounded set of `signature_key`s whose Ed25519 check passed; the oldest
    insertion goes first when full (FIFO: a reading is in one block, so an entry
    is rarely wanted twice). Counts hits and misses of block checks."""

    def __init__(self, capacity: int = 200_000):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._keys: set[bytes] = set()
        self._order: deque[bytes] = deque()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def add(self, key: bytes) -> None:
        """Remember `key`; call only after a real verify returned True."""
        if key in self._keys:
            return
        if len(self._order) >= self.capacity:
            self._keys.discard(self._order.popleft())
        self._keys.add(key)
        self._order.append(key)

    def check(self, key: bytes, verify: Callable[[], bool]) -> bool:
        """The verdict on one signature: True on a hit, else `verify()` (remembered if True)."""
        if key in self._keys:
            self.hits += 1
            return True
        self.misses += 1
        ok = verify()
        if ok:
            self.add(key)
        return ok


class Preverifier:
    """The stream side: `offer` queues a message (at once, from the MQTT reader);
    `work` verifies queued readings in short slices while the chain side is idle.

    `registry()` gives the current registry (a static `Registry`, or the registry
    chain's latest view); the key binds the public key it names, so a block judged
    by another view (a re-keyed or retired meter) cannot hit an entry made here."""

    def __init__(self, area: str, registry: Callable[[], Registry], kid: str, cache: VerifiedSignatures,
                 cfg: PreverifyConfig = PreverifyConfig(), *, clock: Callable[[], float] = time.monotonic):
        self.area = area
        self.registry = registry
        self.kid = kid
        self.cache = cache
        self.cfg = cfg
        self.clock = clock
        self.topics = (readings_filter(area),)
        self.counts: Counter[str] = Counter()
        self._queue: deque[tuple[float, str, bytes]] = deque()
        self._ready = asyncio.Event()
        self._warned: set[str] = set()
        self._last_status = (float("-inf"), 0)  # the first summary at once, then at most every STATUS_EVERY_S

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, topic: str, payload: bytes) -> None:
        if len(self._queue) >= self.cfg.queue:
            self._queue.popleft()
            self._drop("queue_full", "")
        self._queue.append((self.clock(), topic, payload))
        self._ready.set()

    def step(self, budget_s: float) -> int:
        """Check queued readings for about `budget_s` seconds (at least one); how many."""
        done, start = 0, time.perf_counter()
        oldest = self.clock() - self.cfg.max_age_s
        while self._queue:
            at, topic, payload = self._queue.popleft()
            done += 1
            if at < oldest:
                self._drop("stale", "")
            else:
                try:
                    self.counts[self._check(topic, payload)] += 1
                except Rejected as exc:
                    self._drop(exc.reason, exc.detail)
                except Exception as exc:  # never let one message stop the validator
                    self._drop("error", repr(exc)[:120])
            if time.perf_counter() - start >= budget_s:
                break
        return done

    def _check(self, topic: str, payload: bytes) -> str:
        if len(payload) > MAX_PAYLOAD:
            raise Rejected("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD}")
        parts = topic.split("/")
        r = parse_reading(payload)
        if len(parts) != 6 or parts[2] != self.area or parts[4] != r.meter:
            raise Rejected("topic_mismatch", f"{topic!r} carries meter {r.meter!r}")
        reg = self.registry()
        entry = reg.get(r.meter)
        if entry is None:
            raise Rejected("unknown_meter", r.meter)
        if r.kid != self.kid:
            raise Rejected("unknown_key_id", r.kid)  # a block would refuse it before its signature
        key = signature_key(entry.public_key, r.hash, r.sig)
        if key in self.cache:
            return "known"
        if not reg.verify(r.meter, r.signed_bytes, bytes.fromhex(r.sig)):
            raise Rejected("bad_signature", f"{r.meter} seq {r.seq}")
        self.cache.add(key)
        return "verified"

    def _drop(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if reason not in self._warned:  # the first of each kind in full; then the counts say it
            self._warned.add(reason)
            event(log, "preverify_dropped", logging.WARNING, reason=reason, detail=detail)

    async def work(self, idle: Callable[[], bool]) -> None:
        """Run until cancelled: a slice of checks whenever there is work and `idle()`
        (the chain side has nothing in hand); a proposal never waits behind the queue."""
        budget = self.cfg.slice_ms / 1000
        while True:
            if not self._queue:
                self._ready.clear()
                self.status()
                await self._ready.wait()
                continue
            if not idle():
                await asyncio.sleep(IDLE_POLL_S)
                continue
            self.step(budget)
            await asyncio.sleep(0)

    def status(self, *, force: bool = False) -> None:
        """Log the counters, at most every STATUS_EVERY_S unless `force`, and only if they moved."""
        now, total = self.clock(), sum(self.counts.values())
        last, seen = self._last_status
        if total != seen and (force or now - last >= STATUS_EVERY_S):
            self._last_status = (now, total)
            event(log, "preverify", queue=len(self._queue), cache=len(self.cache), cache_hits=self.cache.hits,
                  cache_misses=self.cache.misses, **self.counts)
