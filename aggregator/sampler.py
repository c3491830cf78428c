"""Where a process's time goes: a sampling profiler for a running node (`Sampler`) and
wall-clock timers around the named stages of a hot path (`Stages`).

A daemon thread looks at every other thread's Python stack every `interval_s`
(`sys._current_frames`) and counts the frames of the threads that are working,
not waiting (in `select`, a lock, a queue). A thread inside C code (SQLite, a
BLS signature, a socket write) shows the Python function that called it, which
is the name wanted. Unlike cProfile it sees the worker threads `asyncio.to_thread`
runs SQLite on, and it costs one stack walk per sample, not a hook per call.
The shares are of working samples, so they say where the CPU (and the waiting
on the disk) went, not how long the process sat idle. One bias to know: the
sampler needs the GIL to look, and gets it soonest when the event loop lets go
of it, i.e. in a system call (a socket send, SQLite); pure-Python work (hashing
in a loop, JSON) shows up only at the interpreter's switch interval (5 ms) and is
under-counted. `Stages` has no such bias: it times the stages themselves.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

__all__ = ["Sampler", "Stages"]

# (file name, function) of frames where a thread waits for work or I/O readiness.
IDLE = {("selectors.py", "select"), ("threading.py", "wait"), ("queue.py", "get"), ("thread.py", "_worker"),
        ("base_events.py", "_run_once"), ("threading.py", "_wait_for_tstate_lock"), ("sampler.py", "_run")}


OURS = {"aggregator", "certlog", "gridledger"}   # packages whose frames `inclusive` counts


def _parts(frame: FrameType) -> list[str]:
    """The frame's file as [package, file] (fewer for "<frozen ...>" and the like)."""
    return frame.f_code.co_filename.replace("\\", "/").rsplit("/", 2)[-2:]


def _name(frame: FrameType) -> str:
    return f"{'/'.join(_parts(frame))}:{frame.f_code.co_name}"


class Sampler:
    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.samples = 0          # thread stacks looked at
        self.busy = 0             # of those, working
        self.own: Counter[str] = Counter()        # innermost frame of a working thread
        self.inclusive: Counter[str] = Counter()  # any frame of ours on a working thread's stack
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = self.t1 = 0.0

    def start(self) -> "Sampler":
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "Sampler":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.t1 = time.monotonic()
        return self

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    self._count(frame)

    def _count(self, frame: FrameType) -> None:
        self.samples += 1
        if (_parts(frame)[-1], frame.f_code.co_name) in IDLE:
            return
        self.busy += 1
        self.own[_name(frame)] += 1
        seen = set()
        f: FrameType | None = frame
        while f is not None:
            if _parts(f)[0] in OURS:
                seen.add(_name(f))
            f = f.f_back
        self.inclusive.update(seen)

    def report(self, top: int = 12) -> dict:
        """The `top` functions by their share of working samples: `own` (the innermost
        frame) and `inclusive` (anywhere on the stack), and how many samples there were."""
        def share(c: Counter[str]) -> list[list]:
            return [[name, round(n / self.busy, 3)] for name, n in c.most_common(top)] if self.busy else []
        return {"seconds": round(self.t1 - self.t0, 3), "interval_s": self.interval_s, "samples": self.samples,
                "busy_samples": self.busy, "own": share(self.own), "inclusive": share(self.inclusive)}


class Stages:
    """Wall seconds (and calls) per named stage: `with stages("commit"): ...`. Cheap
    enough (two clock reads) to stay on in a node; `since` gives what a period spent."""

    def __init__(self):
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def mark(self) -> tuple[Counter[str], Counter[str]]:
        return Counter(self.seconds), Counter(self.calls)

    def since(self, mark: tuple[Counter[str], Counter[str]]) -> dict[str, dict[str, float]]:
        """{stage: {"s": seconds, "calls": n}} spent since `mark`."""
        s0, c0 = mark
        return {k: {"s": round(v - s0[k], 4), "calls": self.calls[k] - c0[k]}
                for k, v in sorted(self.seconds.items()) if self.calls[k] > c0[k]}
