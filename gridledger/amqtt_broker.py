"""Fallback broker for the demo only, when Mosquitto cannot be installed: the
pure-Python amqtt broker on loopback. `python -m gridledger.amqtt_broker PORT`"""

from __future__ import annotations

import asyncio
import signal
import sys


async def serve(port: int) -> None:
    from amqtt.broker import Broker  # installed by scripts/setup.sh only when needed

    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 1000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
