"""The sampling profiler a promoted node runs during its fill (`GRIDLEDGER_FILL_PROFILE`):
it names the function a working thread is in, and does not count a waiting one."""

from __future__ import annotations

import hashlib
import threading
import time

from aggregator.sampler import Sampler


def _hashing(sampler: Sampler, samples: int, most_s: float) -> None:
    """Work until the sampler has seen `samples` working stacks (bounded: a loaded machine is slow)."""
    x, until = b"a" * 1350, time.monotonic() + most_s
    while sampler.busy < samples and time.monotonic() < until:
        hashlib.sha256(x).digest()


def test_the_sampler_names_the_working_function_and_skips_waiting_threads():
    idle = threading.Event()
    waiting = threading.Thread(target=idle.wait, daemon=True)   # blocked all along: never counted
    waiting.start()
    s = Sampler(interval_s=0.001).start()
    _hashing(s, 50, 20.0)
    report = s.stop().report()
    idle.set()
    waiting.join()
    own = dict(report["own"])
    assert report["busy_samples"] >= 50, report
    assert own.get("tests/test_storage_sampler.py:_hashing", 0) >= 0.8, report
    assert report["samples"] >= report["busy_samples"] + 20   # the waiting thread was seen, and skipped
    assert "tests/test_storage_sampler.py:_hashing" not in dict(report["inclusive"])   # only our packages
