"""A lean MQTT 3.1.1 session for one hot path: subscribe to one topic filter at
QoS 0, hand every PUBLISH's (topic, payload) to a callback, and write QoS 0
publishes a batch per socket write. The gateway's readings and acks travel on
it, and so do the responses a storage node's requests get (the bulk bytes of a
fill); every other role and topic speaks aiomqtt.

Why not paho (through aiomqtt) for this path: on this machine a 1.3 KB QoS 0
message costs the receiving process about 30 µs of CPU through paho's callback
(four to five `recv` calls per packet, an `MQTTMessage`, a topic-filter walk),
11 µs through gmqtt, and 3 µs here: an `asyncio.Protocol` that parses the
packets out of whatever each read returned. At a gateway's rate that is a
tenth of its core (`bench/ingest.py`, docs/performance.md).

What it speaks (MQTT 3.1.1, OASIS standard): CONNECT with a clean session,
username and password, TLS through `ssl` with the operator's CA; one SUBSCRIBE;
PUBLISH in both directions at QoS 0 (a broker never delivers above the granted
QoS, and a QoS 1 PUBLISH that came anyway is answered with its PUBACK);
PINGREQ/PINGRESP for the keepalive, which also detects a silent broker; and
DISCONNECT. On request (`coalesce_s`) it coalesces reads: after a short read it
leaves the socket alone a moment, so a trickle of messages is read in groups
rather than one wake-up each (the gateway's reading link). What it leaves out,
by design: sessions (the reading path keeps no broker-side state: meters resend
what was not acked), QoS 1/2 publishing, wills and MQTT 5. Every refusal is a
`LinkError` with the broker's reason.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import time
from typing import Callable, Iterable

from .config import MqttConfig
from .logs import event
from .mqtt import RECONNECT_MAX_S

__all__ = ["Link", "LinkError", "LinkSession", "open_link", "publish_frame", "MAX_PACKET"]

# A packet longer than this is skipped as it streams by, never buffered whole.
MAX_PACKET = 1 << 20
CONNECT_TIMEOUT_S = 10.0
# With `coalesce_s`, a read shorter than this pauses reading for `coalesce_s`: the
# inflow is a trickle, and a wake-up per message or two costs more than its parsing.
# A longer read means the data is flowing: reading goes on at once.
COALESCE_BELOW = 64 * 1024

_CONNACK_REASONS = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
                    4: "bad user name or password", 5: "not authorized"}


class LinkError(Exception):
    """The broker refused the session or the subscription, or broke the protocol."""


def _remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (3.1.1 §2.2.3)."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


@functools.lru_cache(maxsize=4096)
def _topic_part(topic: str) -> bytes:
    """A topic as a PUBLISH carries it; the gateway sends to the same few thousand
    (one ack topic per meter, the chain's) over and over."""
    return _string(topic)


def publish_frame(topic: str, payload: bytes) -> bytes:
    """One PUBLISH packet at QoS 0, not retained (§3.3): no packet id.

    The payload is copied once. Adding the parts two at a time copied a 1.3 MB
    proposal twice, each into freshly mapped memory: 0.96 ms a proposal against
    0.03 ms, about 1 µs of the gateway's CPU per reading it carries."""
    t = _topic_part(topic)
    n = len(t) + len(payload)
    if n < 128:  # an ack: the remaining length is one byte
        return b"\x30%c%s%s" % (n, t, payload)
    return b"".join((b"\x30", _remaining_length(n), t, payload))


def _connect_packet(client_id: str, keepalive: int, username: str | None, password: str | None) -> bytes:
    flags = 0x02  # clean session
    payload = _string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            payload += _string(password)
    body = _string("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return b"\x10" + _remaining_length(len(body)) + body


def _subscribe_packet(packet_id: int, topic_filters: tuple[str, ...]) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(_string(f) + b"\x00" for f in topic_filters)
    return b"\x82" + _remaining_length(len(body)) + body


class Link(asyncio.Protocol):
    """One connection. Build it with `open_link`; `closed` completes when it ends."""

    def __init__(self, on_publish: Callable[[str, bytes], None], coalesce_s: float = 0.0):
        self.on_publish = on_publish
        self.coalesce_s = coalesce_s  # 0: read as soon as data arrives (see COALESCE_BELOW)
        self.reads = 0                # data_received calls
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._skip = 0            # bytes still to discard of an oversized packet
        self._waiting: dict[int, asyncio.Future] = {}  # packet type -> the answer awaited
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.last_heard = time.monotonic()
        self.received = 0
        self.oversized = 0        # packets above MAX_PACKET, skipped
        self.undecodable = 0      # PUBLISH topics that are not UTF-8

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(LinkError(f"connection lost: {exc or 'closed by the broker'}"))
        if not self.closed.done():
            self.closed.set_result(exc)  # its waiters shield it: see close()

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        self.reads += 1
        if self.coalesce_s and len(data) < COALESCE_BELOW and self.transport is not None:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(self.coalesce_s, self._resume)
        if self._skip:
            cut = min(self._skip, len(data))
            self._skip -= cut
            data = data[cut:]
        buf = self._buf
        buf += data
        pos, n = 0, len(buf)
        while n - pos >= 2:
            first = buf[pos]
            length, shift, i, whole = 0, 0, pos + 1, False
            while i < n:  # the remaining length, at most 4 bytes
                b = buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                if not b & 0x80:
                    whole = True
                    break
                shift += 7
                if shift > 21:
                    self._fail("remaining length longer than 4 bytes")
                    return
            if not whole:
                break  # the length itself has not all arrived
            end = i + length
            if length > MAX_PACKET:
                self.oversized += 1
                self._skip = max(0, end - n)
                pos = min(end, n)
                continue
            if end > n:
                break
            kind = first >> 4
            if kind == 3:
                self._publish(first, buf, i, end)
            else:
                self._control(kind, bytes(buf[i:end]))
            pos = end
        del buf[:pos]

    def _resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # -- packets -------------------------------------------------------------

    def _publish(self, first: int, buf: bytearray, i: int, end: int) -> None:
        if end - i < 2:
            self._fail("PUBLISH without a topic length")
            return
        t0 = i + 2
        t1 = t0 + ((buf[i] << 8) | buf[i + 1])
        qos = (first >> 1) & 3
        p0 = t1 + 2 if qos else t1
        if t1 > end or p0 > end:
            self._fail("PUBLISH shorter than its topic")
            return
        if qos == 1 and self.transport is not None:  # above what we asked for; still answer it
            self.transport.write(b"\x40\x02" + bytes(buf[t1:p0]))
        try:
            topic = buf[t0:t1].decode("utf-8")
        except UnicodeDecodeError:
            self.undecodable += 1
            return
        self.received += 1
        self.on_publish(topic, bytes(buf[p0:end]))

    def _control(self, kind: int, body: bytes) -> None:
        fut = self._waiting.pop(kind, None)
        if fut is not None and not fut.done():
            fut.set_result(body)
        # PINGRESP (13) only refreshes last_heard; anything else unasked for is ignored.

    def _fail(self, why: str) -> None:
        err = LinkError(f"protocol error: {why}")
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(err)
        if self.transport is not None:
            self.transport.abort()

    async def _ask(self, packet: bytes, answer: int, timeout: float) -> bytes:
        fut = asyncio.get_running_loop().create_future()
        self._waiting[answer] = fut
        self.write(packet)
        return await asyncio.wait_for(fut, timeout)

    # -- use -----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> bool:
        if not self.is_open:
            return False
        self.transport.write(data)
        return True

    def publish_many(self, messages: Iterable[tuple[str, bytes]]) -> int:
        """Publish at QoS 0, all in one write; how many were written (0: not connected)."""
        frames = [publish_frame(t, p) for t, p in messages]
        return len(frames) if frames and self.write(b"".join(frames)) else 0

    async def keepalive(self, every_s: float) -> None:
        """PINGREQ every `every_s`; close the link when the broker has been silent for
        1.5 keepalives (MQTT's own rule for the other direction)."""
        while self.is_open:
            await asyncio.sleep(every_s / 2)
            if time.monotonic() - self.last_heard > 1.5 * every_s:
                self.transport.abort()
                return
            self.write(b"\xc0\x00")

    async def close(self) -> None:
        if self.is_open:
            self.write(b"\xe0\x00")  # DISCONNECT: the broker drops the session quietly
            self.transport.close()
        if not self.closed.cancelled():
            await asyncio.shield(self.closed)


async def open_link(cfg: MqttConfig, client_id: str, topic_filter: str | tuple[str, ...],
                    on_publish: Callable[[str, bytes], None], *, timeout: float = CONNECT_TIMEOUT_S,
                    coalesce_s: float = 0.0) -> Link:
    """Connect, log in and subscribe to `topic_filter` (one, or a tuple) at QoS 0;
    raises `LinkError` (refused), `OSError` (unreachable) or `TimeoutError`."""
    filters = (topic_filter,) if isinstance(topic_filter, str) else tuple(topic_filter)
    loop = asyncio.get_running_loop()
    tls = ssl.create_default_context(cafile=str(cfg.tls_ca)) if cfg.tls_ca else None
    _, link = await asyncio.wait_for(
        loop.create_connection(lambda: Link(on_publish, coalesce_s), cfg.host, cfg.port, ssl=tls), timeout)
    try:
        sock = link.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connack = await link._ask(_connect_packet(client_id, cfg.keepalive, cfg.username, cfg.password), 2, timeout)
        if len(connack) != 2 or connack[1] != 0:
            code = connack[1] if len(connack) == 2 else -1
            raise LinkError(f"broker refused the connection: {_CONNACK_REASONS.get(code, f'code {code}')}")
        suback = await link._ask(_subscribe_packet(1, filters), 9, timeout)
        if len(suback) != 2 + len(filters) or any(code > 2 for code in suback[2:]):
            raise LinkError(f"broker refused the subscription to {', '.join(filters)} (ACL?)")
    except BaseException:
        if link.transport is not None:
            link.transport.abort()
        raise
    return link


class LinkSession:
    """Keep one link up until stopped: connect, subscribe, keep it alive, and after a
    loss reconnect with exponential back-off. `link` is the live link, or None."""

    def __init__(self, cfg: MqttConfig, client_id: str, topic_filter: str | tuple[str, ...],
                 on_publish: Callable[[str, bytes], None],
                 log: logging.Logger, *, name: str, coalesce_s: float = 0.0):
        self.cfg, self.client_id, self.topic_filter = cfg, client_id, topic_filter
        self.coalesce_s = coalesce_s
        self.on_publish, self.log, self.name = on_publish, log, name
        self.link: Link | None = None
        self._dropped = {"oversized": 0, "undecodable": 0}  # by links that have ended
        self._io = {"reads": 0, "received": 0}

    def dropped(self) -> dict[str, int]:
        """Messages every link of this session dropped unread, by reason."""
        live = self.link
        return {k: v + (getattr(live, k) if live is not None else 0) for k, v in self._dropped.items()}

    def io(self) -> dict[str, int]:
        """Socket reads and PUBLISH packets received, over every link of this session."""
        live = self.link
        return {k: v + (getattr(live, k) if live is not None else 0) for k, v in self._io.items()}

    def _ended(self, link: Link) -> None:
        for counts in (self._dropped, self._io):
            for k in counts:
                counts[k] += getattr(link, k)

    def publish_many(self, messages: Iterable[tuple[str, bytes]]) -> int:
        """`Link.publish_many` on the live link; 0 when there is none."""
        return self.link.publish_many(messages) if self.link is not None else 0

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`; the last link stays open for `close` (a stopping gateway still acks)."""
        cfg, delay = self.cfg, 0.5
        while not stop.is_set():
            try:
                link = await open_link(cfg, self.client_id, self.topic_filter, self.on_publish,
                                       coalesce_s=self.coalesce_s)
            except (OSError, LinkError, TimeoutError) as exc:
                event(self.log, "mqtt_down", logging.WARNING, link=self.name, error=str(exc) or type(exc).__name__,
                      retry_s=delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            self.link, delay = link, 0.5
            event(self.log, "mqtt_up", link=self.name, host=cfg.host, port=cfg.port)
            keepalive = asyncio.create_task(link.keepalive(cfg.keepalive))
            stopped = asyncio.create_task(stop.wait())
            try:
                # Shielded: a cancelled wait must not cancel the link's own future.
                await asyncio.wait([asyncio.shield(link.closed), stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                keepalive.cancel()
                stopped.cancel()
            if stop.is_set():
                return
            self._ended(link)
            self.link = None
            event(self.log, "mqtt_down", logging.WARNING, link=self.name, error="connection lost", retry_s=delay)

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
            self._ended(self.link)
            self.link = None
