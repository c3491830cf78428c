"""The MQTT session every long-running role keeps: connect, serve, and on a lost
connection reconnect with exponential back-off until asked to stop."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable, Iterable

import aiomqtt
import paho.mqtt.client as mqtt

from .config import MqttConfig
from .logs import event

__all__ = ["NO_DELAY", "keep_connected", "until_stopped", "auth_options", "publish_many"]

# Acks and votes are small and latency-bound: never let Nagle hold one back for a delayed ACK.
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
RECONNECT_MAX_S = 10.0


def auth_options(cfg: MqttConfig) -> dict:
    """aiomqtt.Client options for the account and, with `tls_ca`, TLS that trusts only that CA."""
    tls = aiomqtt.TLSParameters(ca_certs=str(cfg.tls_ca)) if cfg.tls_ca else None
    return {"username": cfg.username, "password": cfg.password, "tls_params": tls}


async def keep_connected(cfg: MqttConfig, identifier: str, topics: Iterable[str | tuple[str, int]],
                         stop: asyncio.Event, serve: Callable[[aiomqtt.Client], Awaitable[None]],
                         log: logging.Logger, *, clean_session: bool = False, **client_options) -> None:
    """Subscribe to `topics` (QoS 1 unless given as (topic, qos); persistent session
    unless `clean_session`) and run `serve(client)`; reconnect after an `MqttError`
    until `stop` is set."""
    topics = [t if isinstance(t, tuple) else (t, 1) for t in topics]
    delay = 0.5
    while not stop.is_set():
        try:
            async with aiomqtt.Client(cfg.host, cfg.port, identifier=cfg.client_id or identifier,
                                      **auth_options(cfg), keepalive=cfg.keepalive,
                                      clean_session=clean_session, socket_options=NO_DELAY, **client_options) as client:
                for t, qos in topics:
                    await client.subscribe(t, qos=qos)
                event(log, "mqtt_up", host=cfg.host, port=cfg.port)
                delay = 0.5
                await serve(client)
        except aiomqtt.MqttError as exc:
            event(log, "mqtt_down", logging.WARNING, error=str(exc), retry_s=delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, RECONNECT_MAX_S)


async def until_stopped(stop: asyncio.Event, *works: Awaitable[None]) -> None:
    """Run `works` until one ends or `stop` is set, then cancel the rest; the first
    exception (an `MqttError` for `keep_connected` to reconnect on) propagates."""
    tasks = [asyncio.ensure_future(w) for w in works]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            if t in done and t.exception() is not None:
                raise t.exception()
    finally:
        for t in (*tasks, stopper):
            t.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)


def _remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (3.1.1 §2.2.3)."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def publish_frame(topic: str, payload: bytes) -> bytes:
    """One MQTT 3.1.1 PUBLISH packet at QoS 0, not retained (§3.3): no packet id."""
    t = topic.encode("utf-8")
    body = len(t).to_bytes(2, "big") + t + payload
    return b"\x30" + _remaining_length(len(body)) + body


def publish_many(client: aiomqtt.Client, messages: Iterable[tuple[str, bytes]]) -> int:
    """Publish `messages` at QoS 0 in one socket write; the number queued (0 when
    not connected, and then none is: QoS 0 is dropped off-line anyway).

    For the gateway's acks, hundreds per batch: paho's publish() costs a
    `MQTTMessageInfo` (a lock and a condition), a send() and an on_publish
    callback with fresh reason/properties objects per message, which measured
    more than a third of an Ed25519 verify per ack. Here the packets are framed
    by `publish_frame` and handed to paho's writer as one opaque packet, so paho
    still owns the socket, its ordering and its keepalive. It relies on paho
    2.2's `_packet_queue` (pinned in pyproject.toml) and MQTT 3.1.1 framing;
    with anything else it falls back to one publish() per message."""
    paho = client._client
    if not paho.is_connected():
        return 0
    messages = list(messages)
    if paho.protocol != mqtt.MQTTv311 or not hasattr(paho, "_packet_queue"):
        return sum(paho.publish(t, p, qos=0).rc == mqtt.MQTT_ERR_SUCCESS for t, p in messages)
    if messages:
        # Command 0: paho writes the bytes and runs no per-packet callback.
        paho._packet_queue(0, b"".join(publish_frame(t, p) for t, p in messages), 0, 0)
    return len(messages)
