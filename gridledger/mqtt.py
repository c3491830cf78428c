"""The MQTT session every long-running role keeps: connect, serve, and on a lost
connection reconnect with exponential back-off until asked to stop."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable, Iterable

import aiomqtt

from .config import MqttConfig
from .logs import event

__all__ = ["NO_DELAY", "keep_connected", "until_stopped", "auth_options"]

# Acks and votes are small and latency-bound: never let Nagle hold one back for a delayed ACK.
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
RECONNECT_MAX_S = 10.0


def auth_options(cfg: MqttConfig) -> dict:
    """aiomqtt.Client options for the account and, with `tls_ca`, TLS that trusts only that CA."""
    tls = aiomqtt.TLSParameters(ca_certs=str(cfg.tls_ca)) if cfg.tls_ca else None
    return {"username": cfg.username, "password": cfg.password, "tls_params": tls}


async def keep_connected(cfg: MqttConfig, identifier: str, topics: Iterable[str], stop: asyncio.Event,
                         serve: Callable[[aiomqtt.Client], Awaitable[None]], log: logging.Logger,
                         *, clean_session: bool = False, **client_options) -> None:
    """Subscribe to `topics` (QoS 1, persistent session unless `clean_session`) and run
    `serve(client)`; reconnect after an `MqttError` until `stop` is set."""
    topics = list(topics)
    delay = 0.5
    while not stop.is_set():
        try:
            async with aiomqtt.Client(cfg.host, cfg.port, identifier=cfg.client_id or identifier,
                                      **auth_options(cfg), keepalive=cfg.keepalive,
                                      clean_session=clean_session, socket_options=NO_DELAY, **client_options) as client:
                for t in topics:
                    await client.subscribe(t, qos=1)
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
