"""Plumbing shared by the bench scripts: the --quick flag, timing samples, the test
Paillier key, and the result (bench/results/<name>.json plus one JSON last line)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TEST_KEY = ROOT / "tests" / "vectors" / "paillier_test_key.json"


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="fewer samples: under a minute on 2 cores")
    return ap.parse_args()


def load_test_modulus() -> int:
    """The fixed 2048-bit test modulus n (never a real key)."""
    return int(json.loads(TEST_KEY.read_text())["n"])


def timed(fn: Callable[..., object], *args, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds taken by one call fn(*args), on `clock` (wall time unless told)."""
    t0 = clock()
    fn(*args)
    return clock() - t0


def round_robin(ops: dict[str, tuple[Callable[[], object], int]], reps: int, *,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each op, `reps` figures each, taking one figure of every op
    in turn so that a slow spell of the machine is shared among them. Each op is
    (fn, calls per figure): many calls lift a fast op above the timer's resolution.
    `clock=time.thread_time`: CPU seconds, for comparing with a process's CPU time on
    a machine that others share."""
    def batch(fn: Callable[[], object], inner: int) -> None:
        for _ in range(inner):
            fn()
    out: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(reps):
        for name, (fn, inner) in ops.items():
            out[name].append(timed(batch, fn, inner, clock=clock) / inner)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict:
    """Context for the absolute figures: they only compare within one run."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "platform": platform.platform(terse=True)}


def emit(name: str, result: dict) -> None:
    """Write bench/results/<name>.json (via a .tmp, so a killed run leaves no half
    file) and print the result as the last stdout line."""
    line = json.dumps(result, sort_keys=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f"{name}.tmp"
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS / f"{name}.json")
    sys.stdout.flush()
    print(line, flush=True)
