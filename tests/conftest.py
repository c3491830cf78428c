"""Test harness: a real Mosquitto per test, firmware run by the real MicroPython
Unix port, and bounded waits on MQTT traffic."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from gridledger.broker import Broker, find_mosquitto, start_mosquitto
from gridledger.firmware_build import BUILD, FIRMWARE_SRC, build_firmware, fetch_umqtt, micropython_command

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
MP_SCRIPTS = ROOT / "tests" / "firmware"


@pytest.fixture
def broker(tmp_path) -> Broker:
    """A real Mosquitto on a free loopback port with a generated config."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; `./run test` installs it from Debian's packages")
    b = start_mosquitto(tmp_path / "broker")
    yield b
    b.stop()


@dataclass
class MicroPython:
    """Runs code under the `micropython` binary as a real process."""
    path: list[Path]

    def run(self, script: Path, *args, heap: str = "256k", timeout: float = 120) -> str:
        cmd, env = micropython_command(script, *args, heap=heap, path=self.path)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"micropython {script.name} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res.stdout

    def run_json(self, script: Path, *args, heap: str = "256k", timeout: float = 120):
        """Run a script whose last stdout line is one JSON value."""
        return json.loads(self.run(script, *args, heap=heap, timeout=timeout).strip().splitlines()[-1])


@pytest.fixture(scope="session")
def mp_source() -> MicroPython:
    """Firmware modules from source (firmware/ plus umqtt from build/mplib)."""
    fetch_umqtt()
    return MicroPython([FIRMWARE_SRC, BUILD / "mplib"])


@pytest.fixture(scope="session")
def firmware_bundle() -> Path:
    """The mpy-cross bundle exactly as it is flashed to a board."""
    return build_firmware(BUILD / "test-firmware")


class MqttProbe:
    """Subscribes to topics and waits, always with a time-out, for matching messages."""

    def __init__(self, broker: Broker, *topics: str):
        self.broker = broker
        self.topics = topics
        self.received: list[tuple[str, bytes]] = []
        self._new = asyncio.Event()

    async def __aenter__(self) -> "MqttProbe":
        self.client = aiomqtt.Client(self.broker.host, self.broker.port)
        await self.client.__aenter__()
        for t in self.topics:
            await self.client.subscribe(t, qos=1)
        self._task = asyncio.create_task(self._pump())
        return self

    async def _pump(self) -> None:
        async for msg in self.client.messages:
            self.received.append((msg.topic.value, bytes(msg.payload)))
            self._new.set()

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        await self.client.publish(topic, payload, qos=qos)

    async def expect(self, topic: str, pred=lambda body: True, timeout: float = 10.0, start: int = 0):
        """The first message on `topic` (from index `start`) whose JSON body satisfies pred."""
        async with asyncio.timeout(timeout):
            i = start
            while True:
                while i < len(self.received):
                    t, p = self.received[i]
                    i += 1
                    if t == topic:
                        body = json.loads(p)
                        if pred(body):
                            return body
                self._new.clear()
                await self._new.wait()
