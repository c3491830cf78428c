"""The serial bridge: one wired meter (a Pico on USB, or on a UART) to the broker.

The meter speaks serial framing v1 (`gridledger.serialframe`, docs/serial.md). The
bridge learns the meter's id from its hello, publishes each reading (and signed
alert or event) to that meter's topic with QoS 1 exactly as an MQTT meter would, and writes
the gateway's acks and nacks back down the line. It keeps no state of its own: a reading leaves
the meter's spool only on the gateway's ack, which the gateway sends only once the
reading is durable, so a bridge killed or a cable pulled at any moment costs a
resend, never a reading. Bytes on the line that are not a frame are counted by
reason and logged; they never stop it. The port is reopened (USB unplug and
replug) and the broker reconnected, each with back-off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

import aiomqtt
import serial

from gridledger.errors import Rejected
from gridledger.logs import event
from gridledger.mqtt import keep_connected
from gridledger.serialframe import Decoder, Frame, FrameType, encode
from gridledger.wire import METER_ID_RE, ack_topic, nack_topic, readings_topic

from .alerts import alerts_topic
from .events import events_topic
from .gateway import GatewayConfig

__all__ = ["PROTO", "BRIDGE_REASONS", "SerialBridge"]

log = logging.getLogger("gridledger.bridge")

PROTO = 1  # the hello's "proto": what the meter and the bridge say to each other over the frames
STATUS_EVERY_S = 10.0
REOPEN_MIN_S = 0.5
REOPEN_MAX_S = 5.0      # a replugged meter is back within seconds
WRITE_TIMEOUT_S = 2.0   # a meter that stops reading (USB CDC back-pressure) costs dropped acks, not a hang
BACKLOG = 64            # readings waiting for the broker; beyond it they are dropped and the meter resends
TX_QUEUE = 256          # frames waiting for the line
QUERY_EVERY_S = 1.0     # at most one "say hello" per second to a meter we cannot name yet
BAD_FRAME_LOGS = 20     # bad frames logged one by one per status period; all of them are counted

# Reasons a frame from the meter is refused beyond the framing's own REASONS.
BRIDGE_REASONS = ("bad_hello", "wrong_area", "bad_health", "unexpected_type")


def health_topic(area: str, meter: str) -> str:
    return f"gl/v1/{area}/meters/{meter}/health"


class SerialBridge:
    def __init__(self, cfg: GatewayConfig, port: str, baud: int = 115200,
                 status_every_s: float = STATUS_EVERY_S):
        self.area = cfg.gateway.area
        # The bridge is a client of its own: with the gateway's client id the broker
        # would disconnect one of the two every time the other connects.
        self.mqtt = replace(cfg.mqtt, client_id="")
        self.port = port
        self.baud = baud
        self.status_every_s = status_every_s
        self.max_payload = cfg.gateway.max_payload
        self.meter: str | None = None   # who said hello on the open port
        self.health: dict = {}          # the meter's last health frame
        self.counts: Counter[str] = Counter()    # frames, readings, published, acks, nacks, ...
        self.rejected: Counter[str] = Counter()  # bad frames by reason
        self.dropped: Counter[str] = Counter()   # good readings not forwarded, by why (the meter resends)
        self._client: aiomqtt.Client | None = None
        self._subscribed: str | None = None      # the meter whose ack/nack topics this session holds
        self._want_sub = asyncio.Event()
        self._backlog: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue(BACKLOG)
        self._tx: asyncio.Queue[bytes] | None = None  # per port session
        self._decoder = Decoder(self.max_payload)
        self._last_query = 0.0
        self._logged_bad = 0

    @property
    def identifier(self) -> str:
        return "bridge-" + re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.area}-{Path(self.port).name}")

    def status(self) -> dict:
        return {"port": self.port, "port_open": self._tx is not None, "mqtt": self._client is not None,
                "meter": self.meter, **dict(sorted(self.counts.items())),
                "rejected": dict(sorted(self.rejected.items())), "dropped": dict(sorted(self.dropped.items())),
                **({"meter_seq": self.health.get("seq"), "meter_spooled": self.health.get("journal_depth")}
                   if self.health else {})}

    async def run(self, stop: asyncio.Event) -> None:
        event(log, "start", port=self.port, baud=self.baud, area=self.area, broker=f"{self.mqtt.host}:{self.mqtt.port}",
              client_id=self.identifier)
        tasks = {asyncio.create_task(self._serial(stop), name="serial"),
                 asyncio.create_task(keep_connected(self.mqtt, self.identifier, [], stop, self._serve, log,
                                                    clean_session=True), name="mqtt"),
                 asyncio.create_task(self._status_loop(), name="status")}
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait(tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and not t.cancelled() and t.exception() is not None:
                    raise t.exception()
        finally:
            for t in tasks | {stopper}:
                t.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            event(log, "stop", **self.status())

    # ---- the serial side -------------------------------------------------------------

    async def _serial(self, stop: asyncio.Event) -> None:
        delay = REOPEN_MIN_S
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                ser = serial.Serial(self.port, self.baud, timeout=0, write_timeout=WRITE_TIMEOUT_S, exclusive=True)
            except (serial.SerialException, OSError, ValueError) as exc:
                self.counts["open_failures"] += 1
                event(log, "port_down", logging.WARNING, port=self.port, error=str(exc), retry_s=delay)
            else:
                opened = loop.time()
                try:
                    await self._session(ser, stop)
                finally:
                    ser.close()
                if loop.time() - opened > 10 * REOPEN_MAX_S:
                    delay = REOPEN_MIN_S  # a long good session: the next failure starts afresh
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, REOPEN_MAX_S)

    async def _session(self, ser: serial.Serial, stop: asyncio.Event) -> None:
        """One open port: frames in through the event loop's reader, out through a writer task."""
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[str] = loop.create_future()
        fd = ser.fileno()
        self._decoder = Decoder(self.max_payload)
        self.meter = None  # whoever is on the line now must say hello again
        tx: asyncio.Queue[bytes] = asyncio.Queue(TX_QUEUE)
        self._tx = tx
        self.counts["port_opens"] += 1
        event(log, "port_up", port=self.port, baud=self.baud)

        def readable() -> None:
            try:
                data = ser.read(65536)
            except (serial.SerialException, OSError) as exc:
                loop.remove_reader(fd)
                if not lost.done():
                    lost.set_result(str(exc))
                return
            for item in self._decoder.feed(data):
                self._on_item(item)

        inflight: list[asyncio.Future] = []

        async def writer() -> None:
            while True:
                data = await tx.get()
                fut = loop.run_in_executor(None, ser.write, data)
                inflight[:] = [fut]
                try:
                    await asyncio.shield(fut)
                except serial.SerialTimeoutException:
                    self.counts["tx_timeouts"] += 1  # frame dropped; an ack is sent again on resend
                except (serial.SerialException, OSError) as exc:
                    if not lost.done():
                        lost.set_result(str(exc))
                    return

        loop.add_reader(fd, readable)
        wtask = asyncio.create_task(writer())
        stopper = asyncio.create_task(stop.wait())
        self._send(FrameType.QUERY, b"")
        try:
            await asyncio.wait([lost, stopper], return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                event(log, "port_lost", logging.WARNING, port=self.port, meter=self.meter, error=lost.result())
        finally:
            loop.remove_reader(fd)
            self._tx = None
            for t in (wtask, stopper):
                t.cancel()
            await asyncio.gather(wtask, stopper, return_exceptions=True)
            # A write still in its thread must end before the port closes under it.
            if inflight and not inflight[0].done():
                await asyncio.wait(inflight, timeout=WRITE_TIMEOUT_S + 1)

    def _send(self, ftype: FrameType, payload: bytes) -> None:
        if self._tx is None:
            return
        try:
            self._tx.put_nowait(encode(ftype, payload))
        except asyncio.QueueFull:
            self.counts["tx_overflow"] += 1

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        if self._logged_bad < BAD_FRAME_LOGS:
            self._logged_bad += 1
            event(log, "bad_frame", logging.WARNING, port=self.port, meter=self.meter, reason=reason, detail=detail)

    def _on_item(self, item: Frame | Rejected) -> None:
        if isinstance(item, Rejected):
            self._reject(item.reason, item.detail)
            return
        self.counts["frames"] += 1
        if item.type == FrameType.READING:
            self._on_reading(item.payload)
        elif item.type == FrameType.HELLO:
            self._on_hello(item.payload)
        elif item.type == FrameType.HEALTH:
            self._on_health(item.payload)
        elif item.type == FrameType.LOG:
            self._on_log(item.payload)
        elif item.type == FrameType.ALERT:
            self._on_alert(item.payload)
        elif item.type == FrameType.EVENT:
            self._on_event(item.payload)
        else:  # a bridge-to-meter type coming up the line: an echoing tty, or two bridges wired together
            self._reject("unexpected_type", f"{chr(item.type)} from the meter's side")

    def _on_hello(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
            proto, meter, area = body["proto"], body["meter"], body["area"]
        except (ValueError, TypeError, KeyError):
            self._reject("bad_hello", "not a JSON object with proto, meter and area")
            return
        if proto != PROTO:
            self._reject("bad_hello", f"proto {proto!r}, this bridge speaks {PROTO}")
            return
        if not isinstance(meter, str) or not METER_ID_RE.match(meter):
            self._reject("bad_hello", "meter id must match [A-Za-z0-9_-]{1,32}")
            return
        if area != self.area:
            self._reject("wrong_area", f"meter {meter} belongs to area {area!r}; this gateway serves {self.area!r}")
            return
        self.counts["hellos"] += 1
        if meter != self.meter:
            event(log, "meter_hello", port=self.port, meter=meter, previous=self.meter)
            self.meter = meter
            self._want_sub.set()
        self._welcome()

    def _welcome(self) -> None:
        """Tell the meter the link is usable: broker up and its ack topics subscribed."""
        if self.meter is not None and self._client is not None and self._subscribed == self.meter:
            self._send(FrameType.WELCOME, json.dumps({"meter": self.meter, "area": self.area}).encode())

    def _on_reading(self, payload: bytes) -> None:
        self.counts["readings"] += 1
        self._forward(readings_topic, payload)

    def _on_alert(self, payload: bytes) -> None:
        self.counts["alerts"] += 1
        self._forward(alerts_topic, payload)

    def _on_event(self, payload: bytes) -> None:
        self.counts["events"] += 1
        self._forward(events_topic, payload)

    def _forward(self, topic: Callable[[str, str], str], payload: bytes) -> None:
        """Queue a reading, an alert or an event for the broker, on the topic of the meter on the line."""
        loop = asyncio.get_running_loop()
        if self.meter is None:
            self.dropped["no_hello"] += 1
            if loop.time() - self._last_query >= QUERY_EVERY_S:
                self._last_query = loop.time()
                self._send(FrameType.QUERY, b"")
        elif self._client is None or self._subscribed != self.meter:
            self.dropped["mqtt_down"] += 1
        else:
            try:
                self._backlog.put_nowait((topic(self.area, self.meter), payload, False))
            except asyncio.QueueFull:
                self.dropped["backlog"] += 1

    def _on_health(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._reject("bad_health", "not a JSON object")
            return
        self.health = body
        self.counts["health"] += 1
        event(log, "meter_health", port=self.port, meter=self.meter, health=body)  # nested: its keys are the meter's
        # Retained on the meter's health topic, as an MQTT meter keeps it (docs/uplink.md).
        # Best effort: the next one comes within health_s, so a lost one is not counted.
        if self.meter is not None and self._client is not None:
            try:
                self._backlog.put_nowait((health_topic(self.area, self.meter), payload, True))
            except asyncio.QueueFull:
                pass

    def _on_log(self, payload: bytes) -> None:
        text = payload.decode("utf-8", "replace")
        try:
            line = json.loads(text)
        except ValueError:
            line = text
        self.counts["meter_logs"] += 1
        event(log, "meter_log", port=self.port, meter=self.meter, line=line)

    # ---- the broker side -------------------------------------------------------------

    async def _serve(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._subscribed = None
        self._want_sub.set()
        tasks = {asyncio.create_task(self._acks(client), name="acks"),
                 asyncio.create_task(self._publish(client), name="publish"),
                 asyncio.create_task(self._subscribe(client), name="subscribe")}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
        finally:
            self._client = None
            self._subscribed = None
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            while not self._backlog.empty():  # never published: the meter resends them
                self._backlog.get_nowait()
                self.dropped["mqtt_down"] += 1

    def _acks_of(self, meter: str) -> tuple[str, str]:
        """What the gateway answers a meter on (readings, alerts and events alike): ack, nack."""
        return ack_topic(self.area, meter), nack_topic(self.area, meter)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        """Hold the ack and nack topics of whichever meter is on the line (a Pico swapped
        for another on the same port gets the new meter's)."""
        while True:
            await self._want_sub.wait()
            self._want_sub.clear()
            meter = self.meter
            if meter is None or meter == self._subscribed:
                continue
            if self._subscribed is not None:
                old, self._subscribed = self._subscribed, None
                for t in self._acks_of(old):
                    await client.unsubscribe(t)
            for t in self._acks_of(meter):
                await client.subscribe(t, qos=1)
            self._subscribed = meter
            event(log, "subscribed", meter=meter)
            self._welcome()

    async def _acks(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            meter = self.meter
            if meter is None:
                continue
            payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else str(msg.payload).encode()
            topic = msg.topic.value
            ack, nack = self._acks_of(meter)
            if topic == ack:
                self.counts["acks"] += 1
                self._send(FrameType.ACK, bytes(payload))
            elif topic == nack:
                self.counts["nacks"] += 1
                self._send(FrameType.NACK, bytes(payload))

    async def _publish(self, client: aiomqtt.Client) -> None:
        """One at a time, in line order: the gateway wants each meter's readings in sequence."""
        while True:
            topic, payload, retain = await self._backlog.get()
            await client.publish(topic, payload, qos=1, retain=retain)
            self.counts["published"] += 1

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.status_every_s)
            event(log, "status", **self.status())
            self._logged_bad = 0
