"""The event loop the roles and the load generator run on (gridledger/eventloop.py): uvloop
unless GRIDLEDGER_EVENT_LOOP says asyncio, and a clear refusal of any other name. The real
processes on each loop: tests/test_loadgen.py (gateway and load generator) and every
network test (the roles on uvloop, their default)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from gridledger import eventloop
from gridledger.errors import ConfigError


async def _which() -> tuple[str, str]:
    await asyncio.sleep(0)
    return eventloop.running(), type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default(monkeypatch):
    monkeypatch.delenv(eventloop.ENV, raising=False)
    name, module = eventloop.run(_which())
    assert name == "uvloop" and module.startswith("uvloop")


@pytest.mark.parametrize("value, want", [("asyncio", "asyncio"), (" uvloop ", "uvloop"), ("", "uvloop")])
def test_the_setting_names_the_loop(monkeypatch, value, want):
    monkeypatch.setenv(eventloop.ENV, value)
    name, module = eventloop.run(_which())
    assert name == want
    assert module.startswith("uvloop") == (want == "uvloop")


@pytest.mark.parametrize("value", ["tokio", "UVLOOP", "asyncio,uvloop"])
def test_another_name_is_a_config_error_and_runs_nothing(monkeypatch, value):
    monkeypatch.setenv(eventloop.ENV, value)
    ran = []

    async def work():
        ran.append(1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine was never awaited" would be a RuntimeWarning
        with pytest.raises(ConfigError, match=eventloop.ENV):
            eventloop.run(work())
        gc.collect()
    assert ran == []


def test_a_role_stops_cleanly_on_either_loop_and_says_which(tmp_path):
    """The CLI's role runner on each loop: SIGTERM's handler is installed (add_signal_handler), the
    role runs, and the process logs the loop it ran on."""
    script = tmp_path / "role.py"
    script.write_text(
        "from gridledger.cli import _run_role\n"
        "class Role:\n"
        "    async def run(self, stop):\n"
        "        print('up', flush=True)\n"
        "        await stop.wait()\n"
        "raise SystemExit(_run_role('gateway', 'info', Role()))\n")
    for loop in ("uvloop", "asyncio"):
        env = {**os.environ, eventloop.ENV: loop}
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "up"
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        events = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
        assert [e["loop"] for e in events if e.get("ev") == "event_loop"] == [loop]
