"""The event loop gridledger's long-running processes run on: uvloop (libuv's loop,
made for asyncio servers), or the standard library's with GRIDLEDGER_EVENT_LOOP=asyncio.

Every role (gateway, validators, storage, coordinator) and the load generator spends
a share of each message in the loop itself: waking on a socket, reading it, calling
the protocol, running the callbacks that follow. uvloop does that part in C; the
program is the same asyncio program on either loop. On the gateway (4-validator
bench passes, the two loops alternated, each function's CPU timed inside the
process), the main thread's work outside the reading checks fell from 18.8-22.0 to
15.0-16.7 µs a reading (docs/performance.md). The standard loop stays one setting
away, for debugging (asyncio's debug mode and its tools know it best) or a platform
uvloop does not build on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")
ENV = "GRIDLEDGER_EVENT_LOOP"
LOOPS = ("uvloop", "asyncio")


def chosen() -> str:
    """The loop GRIDLEDGER_EVENT_LOOP names (uvloop when unset); ConfigError for another name."""
    name = os.environ.get(ENV, "").strip() or "uvloop"
    if name not in LOOPS:
        raise ConfigError(f"{ENV} must be one of {', '.join(LOOPS)}, not {name!r}")
    return name


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the chosen loop."""
    try:
        name = chosen()
    except ConfigError:
        main.close()  # never awaited: say so without the "never awaited" warning
        raise
    if name == "asyncio":
        return asyncio.run(main)
    import uvloop
    return uvloop.run(main)


def running() -> str:
    """The name of the loop this coroutine runs on: "uvloop" or "asyncio"."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
