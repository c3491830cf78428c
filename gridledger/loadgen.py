"""Load generator: many wire-v1 meters in one CPython process, for driving a gateway.

Keys are generated ahead and every reading is encrypted, signed and serialised
before the timed phase, so a run measures the broker and the gateway, not this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import aiomqtt
import gmpy2

from aggregator.registry import MeterEntry, dump_registry, load_registry

from .errors import ConfigError, GridledgerError
from .config import MqttConfig
from .meterkeys import MeterKey, new_meter_key
from .mqttlink import Link, LinkError, open_link
from .paillier import PublicKey, djn_exponent, djn_hn, djn_seed_bytes, load_public
from .wire import METER_ID_RE, ZERO_HASH, Reading, make_reading, pack_slots, readings_topic

__all__ = ["LoadError", "RhoPool", "encrypt_with", "LoadMeter", "Outgoing", "LoadArea", "LoadResult",
           "generate_area", "open_area", "precompute", "run_load"]

# The gateway acks once per batch (~20 ms), so throughput is about WINDOW per batch
# latency; a larger window only queues more in the broker (keep it below the
# broker's max_queued_messages, 1000 by default in Mosquitto).
WINDOW = 256
RESEND_S = 5.0  # the firmware's default resend_s
DT = 900
RUN_DT = 1  # interval length of a CLI run (see run_area)


class LoadError(GridledgerError):
    """The broker could not be reached, or the connection failed during a run."""


def encrypt_with(n: int, m: int, rho: int) -> int:
    """c = (1 + m n) rho mod n^2 for a rho already raised to the n-th power."""
    if not 0 <= m < n:
        raise ValueError("plaintext out of range")
    nsq = gmpy2.mpz(n) * n
    return int((1 + gmpy2.mpz(m) * n) * rho % nsq)


def default_exp_bits(nbits: int) -> int:
    """The firmware's DJN exponent length for an nbits modulus (4x its security
    level; firmware/paillier.py says why)."""
    for limit, ebits in ((2048, 448), (3072, 512), (7680, 768)):
        if nbits <= limit:
            return ebits
    return 1024


class RhoPool:
    """The CPython twin of firmware/paillier.py RhoPool (Damgard-Jurik-Nielsen
    short-exponent randomness): same h (a hash of n), same exponent size and the
    same seed bytes drawn from `randbytes`, so a shared byte stream yields the
    same values."""

    def __init__(self, n: int, size: int = 4, exp_bits: int | None = None, *,
                 randbytes: Callable[[int], bytes] = os.urandom):
        self.n = n
        self.nsq = gmpy2.mpz(n) * n
        self.size = size
        self.exp_bits = exp_bits or default_exp_bits(n.bit_length())
        self.seed_bytes = djn_seed_bytes(self.exp_bits)
        self._randbytes = randbytes
        self._hn = gmpy2.mpz(djn_hn(n))
        self._pool: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._pool)

    def full(self) -> bool:
        return len(self._pool) >= self.size

    def refill_one(self) -> None:
        a = djn_exponent(self._randbytes(self.seed_bytes), self.exp_bits)
        self._pool.append(int(gmpy2.powmod(self._hn, a, self.nsq)))

    def take(self) -> int:
        if not self._pool:
            self.refill_one()
        return self._pool.popleft()

    def encrypt(self, m: int) -> int:
        return encrypt_with(self.n, m, self.take())


@dataclass(slots=True)
class LoadMeter:
    """One simulated meter: its key and chain state. Its energy is a pure function
    of (seed, seq), so a reading's plaintext can be recomputed to check a decryption."""
    key: MeterKey
    public: PublicKey
    seed: int | str = 0
    seq: int = 0
    prev: str = ZERO_HASH
    t: int = 0  # end of the last interval, Unix seconds
    dt: int = DT
    tq: str | None = None  # time quality its readings carry (wire extension tq); None: plain v1
    kid: str = field(init=False)

    def __post_init__(self) -> None:
        self.kid = self.public.kid

    @property
    def meter(self) -> str:
        return self.key.meter

    def slots(self, seq: int) -> dict[int, int]:
        """Watt-hours of interval `seq`: an import in one of three bands, sometimes an export."""
        rng = random.Random(f"{self.seed}/{seq}")
        band = rng.randrange(3)
        export = rng.randrange(300) if rng.random() < 0.3 else 0
        return {2 * band: rng.randrange(600), 2 * band + 1: export}

    def reading(self, m: int, rho: int, *, t: int, dt: int) -> Reading:
        """The next reading of the chain for plaintext m and randomness rho."""
        r = make_reading(meter=self.meter, seq=self.seq + 1, t=t, dt=dt, prev=self.prev, kid=self.kid,
                         c=encrypt_with(self.public.n, m, rho), sign=self.key.sign, tq=self.tq)
        self.seq, self.prev, self.t = r.seq, r.hash, t
        return r

    def next(self, pool: RhoPool) -> Reading:
        return self.reading(pack_slots(self.slots(self.seq + 1)), pool.take(), t=self.t + self.dt, dt=self.dt)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A reading ready to publish: the payload and what the ack bookkeeping needs."""
    meter: str
    seq: int
    t: int
    hash: str
    body: bytes


def precompute(meters: list[LoadMeter], readings_per_meter: int, pool: RhoPool | None = None) -> list[Outgoing]:
    """Every payload of the run, round-robin across meters, each meter's in seq order."""
    if not meters:
        return []
    pool = pool or RhoPool(meters[0].public.n)
    per_meter = [[_outgoing(m.next(pool)) for _ in range(readings_per_meter)] for m in meters]
    return [o for one_round in zip(*per_meter) for o in one_round]


def _outgoing(r: Reading) -> Outgoing:
    return Outgoing(r.meter, r.seq, r.t, r.hash, r.to_json())


# -- an area on disk: meter keys, the registry a gateway loads, chain heads -----

MANIFEST = "loadgen.json"


@dataclass(frozen=True, slots=True)
class LoadArea:
    directory: Path
    area: str
    public: PublicKey
    keys: tuple[MeterKey, ...]

    @property
    def registry(self) -> Path:
        return self.directory / "registry.toml"

    def _manifest(self) -> dict:
        return json.loads((self.directory / MANIFEST).read_text())

    def meters(self, start_t: int, dt: int = DT) -> list[LoadMeter]:
        """LoadMeters continuing each chain where the last run left it acknowledged; no
        interval ends before start_t + dt."""
        chains = self._manifest()["chains"]
        out = []
        for k in self.keys:
            seq, prev, t = chains.get(k.meter, (0, ZERO_HASH, start_t))
            out.append(LoadMeter(k, self.public, seed=k.meter, seq=seq, prev=prev, t=max(t, start_t), dt=dt))
        return out

    def record(self, payloads: Iterable[Outgoing], acked: dict[str, int]) -> None:
        """Remember each meter's last acknowledged reading, so the next run extends its chain."""
        doc = self._manifest()
        for o in payloads:
            if o.seq == acked.get(o.meter):
                doc["chains"][o.meter] = [o.seq, o.hash, o.t]
        _write_json(self.directory / MANIFEST, doc)


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _key_path(directory: Path, meter: str) -> Path:
    return directory / "meters" / f"{meter}.ed25519.key"


def _public(key: Path | PublicKey) -> PublicKey:
    return key if isinstance(key, PublicKey) else load_public(key)


def generate_area(directory: Path, meters: int, *, area: str, paillier_public: Path | PublicKey) -> LoadArea:
    """Write `meters` fresh meter keys, their registry (account acct-METER), the area's
    Paillier public key and the manifest into `directory`, which must not hold an area yet."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        raise ConfigError(f"{directory} already holds a load area; use another folder")
    if not METER_ID_RE.match(area):
        raise ConfigError(f"area id {area!r} must match [A-Za-z0-9_-]{{1,32}}")
    if meters < 1:
        raise ConfigError("--meters must be at least 1")
    public = _public(paillier_public)
    keys = tuple(new_meter_key(f"lg{i:05d}") for i in range(1, meters + 1))
    for k in keys:
        k.write_seed(_key_path(directory, k.meter))
    (directory / "registry.toml").write_text(
        dump_registry([MeterEntry(k.meter, f"acct-{k.meter}", k.public_hex) for k in keys]))
    (directory / "paillier.pub.json").write_text(
        json.dumps({"n": str(public.n), "kid": public.kid, "bits": public.bits}, indent=1))
    _write_json(directory / MANIFEST, {"area": area, "kid": public.kid, "chains": {}})
    return LoadArea(directory, area, public, keys)


def open_area(directory: Path, meters: int, *, area: str | None = None,
              paillier_public: Path | PublicKey | None = None) -> LoadArea:
    """The first `meters` meters of the area in `directory`, generating it if it is new.
    A given area id or key must match what the folder was generated for."""
    directory = Path(directory)
    if meters < 1:
        raise ConfigError("--meters must be at least 1")
    if not (directory / MANIFEST).exists():
        if area is None or paillier_public is None:
            raise ConfigError(f"{directory} holds no load area; give the area id and Paillier public key "
                              "(--config, or --area and --paillier-public) to generate one")
        return generate_area(directory, meters, area=area, paillier_public=paillier_public)
    try:
        doc = json.loads((directory / MANIFEST).read_text())
        stored_area, kid = doc["area"], doc["kid"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{directory / MANIFEST}: not a load area manifest ({exc})") from exc
    public = load_public(directory / "paillier.pub.json")
    if area is not None and area != stored_area:
        raise ConfigError(f"{directory} was generated for area {stored_area}, not {area}")
    given = _public(paillier_public) if paillier_public is not None else public
    if given.kid != kid or public.kid != kid:
        raise ConfigError(f"{directory} was generated for Paillier key {kid}, not {given.kid}")
    entries = list(load_registry(directory / "registry.toml"))
    if meters > len(entries):
        raise ConfigError(f"{directory} holds {len(entries)} meters, fewer than {meters}; generate a new folder")
    keys = []
    for e in entries[:meters]:
        try:
            k = MeterKey.read_seed(e.meter, _key_path(directory, e.meter))
        except OSError as exc:
            raise ConfigError(f"no key file for {e.meter}: {exc}") from exc
        if k.public_hex != e.public_key:
            raise ConfigError(f"key file of {e.meter} does not match its registry entry")
        keys.append(k)
    return LoadArea(directory, stored_area, public, tuple(keys))


# -- the timed phase: publish with a window, resend like the firmware, count acks ----

@dataclass(frozen=True, slots=True)
class LoadResult:
    expected: int  # readings in the run
    sent: int  # readings published at least once
    resent: int  # extra publishes after a resend time-out
    acked: dict[str, int]  # per meter, the highest seq the gateway acknowledged
    acked_readings: int  # readings of this run covered by those acks
    nacks: dict[str, int]  # per reason
    peak_unacked: int
    first_publish: float | None  # monotonic seconds
    last_ack: float | None

    @property
    def complete(self) -> bool:
        return self.acked_readings == self.expected

    @property
    def seconds(self) -> float:
        if self.first_publish is None or self.last_ack is None:
            return 0.0
        return max(self.last_ack - self.first_publish, 0.0)

    @property
    def readings_per_s(self) -> float:
        return self.acked_readings / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {"readings": self.expected, "sent": self.sent, "resent": self.resent,
                "acked": self.acked_readings, "nacks": self.nacks, "peak_unacked": self.peak_unacked,
                "seconds": round(self.seconds, 3), "readings_per_s": round(self.readings_per_s, 1),
                "complete": self.complete}


class _Flight:
    """Which readings are out and not yet acknowledged: bookkeeping only, no I/O."""

    def __init__(self, payloads: list[Outgoing]):
        self.payloads = payloads
        self.out: dict[str, dict[int, list]] = {}  # meter -> seq -> [payload, last sent]
        self.last_seq = {o.meter: o.seq for o in payloads}  # payloads are in seq order per meter
        self.acked: dict[str, int] = {}
        self.nacks: Counter[str] = Counter()
        self.unacked = self.sent = self.resent = self.peak = 0
        self.first_publish: float | None = None
        self.last_ack: float | None = None
        self._open = set(self.last_seq)  # meters with readings not yet acknowledged

    @property
    def done(self) -> bool:
        return not self._open

    def published(self, o: Outgoing, now: float) -> None:
        if self.first_publish is None:
            self.first_publish = now
        self.out.setdefault(o.meter, {})[o.seq] = [o, now]
        self.sent += 1
        self.unacked += 1
        self.peak = max(self.peak, self.unacked)

    def ack(self, meter: str, seq: int, now: float) -> None:
        if meter not in self.last_seq or seq <= self.acked.get(meter, 0):
            return  # another meter of the area, or nothing new
        self.acked[meter] = seq
        self.last_ack = now
        out = self.out.get(meter, {})
        for s in [s for s in out if s <= seq]:
            del out[s]
            self.unacked -= 1
        if seq >= self.last_seq.get(meter, seq + 1):
            self._open.discard(meter)

    def due(self, now: float, resend_s: float) -> list[Outgoing]:
        """Readings unacknowledged for resend_s, oldest seq first per meter; marked as sent now."""
        again = []
        for out in self.out.values():
            for seq in sorted(out):
                entry = out[seq]
                if now - entry[1] >= resend_s:
                    entry[1] = now
                    again.append(entry[0])
        self.resent += len(again)
        return again

    def result(self) -> LoadResult:
        acked = sum(1 for o in self.payloads if o.seq <= self.acked.get(o.meter, 0))
        return LoadResult(expected=len(self.payloads), sent=self.sent, resent=self.resent, acked=dict(self.acked),
                          acked_readings=acked, nacks=dict(self.nacks), peak_unacked=self.peak,
                          first_publish=self.first_publish, last_ack=self.last_ack)


class _Session:
    """One MQTT connection driving a _Flight: publisher, ack reader and resender."""

    def __init__(self, client: aiomqtt.Client | None, area: str, flight: _Flight, *, window: int, resend_s: float,
                 clock: Callable[[], float]):
        self.client, self.area, self.flight = client, area, flight
        self.window, self.resend_s, self.clock = window, resend_s, clock
        self.link: Link | None = None  # with the "link" transport, instead of `client`
        self._wake = asyncio.Event()  # an ack arrived or a task failed
        self._error: BaseException | None = None
        self._publishes: set[asyncio.Task] = set()

    def _failed(self, task: asyncio.Task) -> None:
        self._publishes.discard(task)
        if not task.cancelled() and self._error is None:
            exc = task.exception()
            if exc is not None:
                self._error = exc
            elif task.get_name() == "read":
                self._error = LoadError("the broker closed the ack subscription")
            self._wake.set()

    def _publish(self, o: Outgoing) -> None:
        if self.link is not None:
            if not self.link.publish_many([(readings_topic(self.area, o.meter), o.body)]):
                self._error = LoadError("the broker closed the link")
                self._wake.set()
            return
        # aiomqtt hands the message to paho before its first await, so tasks
        # started in order go out in order; each task only waits for the PUBACK.
        task = asyncio.create_task(self.client.publish(readings_topic(self.area, o.meter), o.body, qos=1))
        self._publishes.add(task)
        task.add_done_callback(self._failed)

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            if self._error is not None:
                raise self._error
            self._wake.clear()
            await self._wake.wait()

    async def _read(self) -> None:
        if self.link is not None:  # replies come through on_reply; end when the link does
            await asyncio.shield(self.link.closed)
            return
        async for msg in self.client.messages:
            self.on_reply(msg.topic.value, msg.payload)

    def on_reply(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")  # gl/v1/AREA/meters/METER/ack|nack
        try:
            body = json.loads(payload)
            seq = body["seq"]
        except (TypeError, ValueError, KeyError):
            self.flight.nacks["unreadable_reply"] += 1
            return
        if parts[-1] == "ack" and type(seq) is int:
            self.flight.ack(parts[-2], seq, self.clock())
            self._wake.set()
        else:
            self.flight.nacks[str(body.get("reason", "unreadable_reply"))] += 1

    async def _resend(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.resend_s / 4))
            for o in self.flight.due(self.clock(), self.resend_s):
                self._publish(o)

    async def run(self, timeout: float) -> None:
        tasks = [asyncio.create_task(self._read(), name="read"), asyncio.create_task(self._resend(), name="resend")]
        for t in tasks:
            t.add_done_callback(self._failed)
        try:
            async with asyncio.timeout(timeout):
                for o in self.flight.payloads:
                    await self._until(lambda: self.flight.unacked < self.window)
                    self.flight.published(o, self.clock())
                    self._publish(o)
                await self._until(lambda: self.flight.done)
        except TimeoutError:
            pass  # the result says how far the run got
        finally:
            rest = [*tasks, *self._publishes]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)


async def run_load(host: str, port: int, area: str, payloads: list[Outgoing], *, window: int = WINDOW,
                   timeout: float = 120.0, resend_s: float = RESEND_S,
                   clock: Callable[[], float] = time.monotonic, transport: str = "aiomqtt") -> LoadResult:
    """Publish every payload with at most `window` unacknowledged, resend a meter's
    unacknowledged readings after resend_s, and stop once all are acked or at `timeout`.

    `transport`: "aiomqtt" publishes QoS 1, as meters do; "link" publishes QoS 0 on a
    lean link (gridledger/mqttlink.py) for benches, where the load generator must
    not eat the core it shares: the gateway takes readings at QoS 0 whatever the
    publisher's QoS, so what it receives and does is the same."""
    if window < 1 or timeout <= 0 or resend_s <= 0:
        raise ConfigError("window must be >= 1, timeout and resend_s > 0")
    if transport not in ("aiomqtt", "link"):
        raise ConfigError(f"transport must be aiomqtt or link, not {transport!r}")
    flight = _Flight(payloads)
    if transport == "link":
        session = _Session(None, area, flight, window=window, resend_s=resend_s, clock=clock)
        filters = tuple(f"gl/v1/{area}/meters/+/{kind}" for kind in ("ack", "nack"))
        try:
            link = await open_link(MqttConfig(host=host, port=port), f"loadgen-{area}-{os.getpid()}", filters,
                                   session.on_reply)
        except (OSError, LinkError, TimeoutError) as exc:
            raise LoadError(f"MQTT broker {host}:{port}: {exc}") from exc
        session.link = link
        try:
            await session.run(timeout)
        finally:
            await link.close()
        return flight.result()
    try:
        async with aiomqtt.Client(host, port, identifier=f"loadgen-{area}-{os.getpid()}",
                                  max_inflight_messages=min(window, 1000)) as client:
            client.pending_calls_threshold = 2 * window + 16  # the window bounds them; resends at most double it
            for kind in ("ack", "nack"):
                await client.subscribe(f"gl/v1/{area}/meters/+/{kind}", qos=1)
            await _Session(client, area, flight, window=window, resend_s=resend_s, clock=clock).run(timeout)
    except aiomqtt.MqttError as exc:
        raise LoadError(f"MQTT broker {host}:{port}: {exc}") from exc
    return flight.result()


async def run_area(area: LoadArea, host: str, port: int, readings: int, *, window: int = WINDOW,
                   timeout: float = 120.0, say: Callable[[str], None] = lambda s: None) -> LoadResult:
    """Precompute `readings` per meter, run them against the gateway, and record the acked chain heads."""
    if readings < 1:
        raise ConfigError("--readings must be at least 1")
    # One-second intervals ending now: a run fits in the recent past, and the next run
    # can follow its chains without running ahead of the gateway's clock.
    meters = area.meters(start_t=int(time.time()) - readings * RUN_DT, dt=RUN_DT)
    say(f"precomputing {len(meters) * readings} readings for {len(meters)} meters ...")
    payloads = precompute(meters, readings, RhoPool(area.public.n))
    say(f"publishing to {host}:{port} area {area.area} with window {window} ...")
    result = await run_load(host, port, area.area, payloads, window=window, timeout=timeout)
    area.record(payloads, result.acked)
    return result
