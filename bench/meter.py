"""The meter's hot path under the real MicroPython Unix port (bench/mp_reading_cost.py).

Per reading the meter takes a precomputed r^n from its pool, multiplies, signs and
encodes (the hot path); the baseline, measured in the same run, is the naive meter
that computes r^n for each reading. The pool refill (a DJN short exponent) is
compared with that full r^n, the smallest heap that holds a booted meter's crypto
cycle is found by bisection, and every operation is also timed in CPython (gmpy2,
cryptography) for scale."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import gmpy2

from gridledger.firmware_build import FIRMWARE_SRC, micropython_command
from gridledger.loadgen import default_exp_bits
from gridledger.meterkeys import MeterKey, verifier
from gridledger.wire import kid_of, make_reading, pack_slots, parse_reading, signed_bytes

from benchlib import ROOT, emit, load_test_modulus, machine, parse_args, round_robin

NAME = "meter"
MP_SCRIPT = ROOT / "bench" / "mp_reading_cost.py"
MP_CYCLE = ROOT / "bench" / "mp_meter_cycle.py"
POOL = 4  # the meter's default pool size (firmware/meter.py)
HEAP = "128k"  # what the testbed meters run with; a board has about this much to spare
INTERVAL_S = 900
OPS = ("full_pow", "djn_refill", "djn_pow", "encrypt", "sign", "reading")
# One reading as a meter sends it mid-chain: a non-zero prev and a realistic seq and time.
READING = {"meter": "bench-meter", "seq": 4242, "t": 1795160700, "prev": "5a" * 32}
SEED = bytes(range(32))


def run_micropython(n: int, reps: dict[str, int], timeout: float) -> dict:
    """Run the MicroPython half; its last stdout line is its JSON result."""
    with tempfile.TemporaryDirectory(prefix="gl-bench-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"n": str(n), "seed": SEED.hex(), "reps": reps, **READING}))
        cmd, env = micropython_command(MP_SCRIPT, job, heap=HEAP, path=[FIRMWARE_SRC])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"micropython exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def runs_in_heap(n: int, heap_kib: int, cycles: int, timeout: float) -> bool:
    """Whether a booted meter's crypto cycle completes in a heap of heap_kib KiB."""
    with tempfile.TemporaryDirectory(prefix="gl-bench-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"n": str(n), "seed": SEED.hex(), "pool": POOL, "cycles": cycles}))
        cmd, env = micropython_command(MP_CYCLE, job, heap=f"{heap_kib}k", path=[FIRMWARE_SRC])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 and "MemoryError" not in res.stdout + res.stderr:
        raise RuntimeError(f"micropython exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res.returncode == 0


def smallest_heap_kib(n: int, cycles: int, timeout: float) -> int:
    """Bisect to 1 KiB the smallest -X heapsize that runs the cycle."""
    lo, hi = 4, 128  # 4 KiB cannot even hold the pool; 128 KiB is what testbed meters get
    if not runs_in_heap(n, hi, cycles, timeout):
        raise RuntimeError(f"the meter's crypto cycle does not run in {hi} KiB")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if runs_in_heap(n, mid, cycles, timeout):
            hi = mid
        else:
            lo = mid
    return hi


def cpython_ops(n: int) -> dict[str, tuple]:
    """The same five operations in CPython, each as (fn, calls per sample)."""
    nz, nsq = gmpy2.mpz(n), gmpy2.mpz(n) * n
    r = gmpy2.mpz(int.from_bytes(os.urandom(256), "big") % n)
    hn = gmpy2.powmod(r, nz, nsq)
    exp_bytes = (default_exp_bits(n.bit_length()) + 7) // 8  # the firmware's DJN exponent size
    m = gmpy2.mpz(pack_slots({0: 812, 1: 0}))
    rho = hn  # any full-size unit mod n^2 times the one multiply alike
    c = int((1 + m * nz) * rho % nsq)
    sign = MeterKey(READING["meter"], SEED).private.sign
    kid = kid_of(n)
    sb = signed_bytes(READING["meter"], READING["seq"], READING["t"], 900, READING["prev"], kid, format(c, "x"))

    def reading() -> None:
        rd = make_reading(meter=READING["meter"], seq=READING["seq"], t=READING["t"], dt=900,
                          prev=READING["prev"], kid=kid, c=c, sign=sign)
        rd.to_json(), rd.hash

    return {
        "full_pow": (lambda: gmpy2.powmod(r, nz, nsq), 1),
        # GMP's powmod for both: the comb only pays where pow is square-and-multiply.
        "djn_refill": (lambda: gmpy2.powmod(hn, int.from_bytes(os.urandom(exp_bytes), "big") | 1, nsq), 2),
        "djn_pow": (lambda: gmpy2.powmod(hn, int.from_bytes(os.urandom(exp_bytes), "big") | 1, nsq), 2),
        "encrypt": (lambda: (1 + m * nz) * rho % nsq, 2000),
        "sign": (lambda: sign(sb), 200),
        "reading": (reading, 200),
    }


def main() -> None:
    args = parse_args(__doc__)
    if args.quick:
        mp_reps = {"full_pow": 5, "djn_refill": 9, "djn_pow": 5, "encrypt": 50, "sign": 9, "reading": 9}
        cp_reps, timeout = 10, 120
    else:
        mp_reps = {"full_pow": 21, "djn_refill": 41, "djn_pow": 21, "encrypt": 201, "sign": 41, "reading": 41}
        cp_reps, timeout = 30, 600
    n = load_test_modulus()
    ops = cpython_ops(n)

    # CPython samples half before and half after the MicroPython run, so a slow
    # spell of the machine does not fall wholly on one side of the ratios.
    cp = round_robin(ops, cp_reps - cp_reps // 2)
    mp = run_micropython(n, mp_reps, timeout)
    for op, xs in round_robin(ops, cp_reps // 2).items():
        cp[op] += xs

    # The meter's own reading must be a real one: it parses and its signature verifies.
    rd = parse_reading(mp["payload"].encode())
    if not verifier(MeterKey(rd.meter, SEED).public_hex)(rd.signed_bytes, bytes.fromhex(rd.sig)):
        raise AssertionError("the reading made under MicroPython does not verify")

    # Each op does the same work every call and noise only ever adds time, so the
    # fastest sample is the best estimate. (The DJN exponent is random: its cost
    # varies by a few per cent, and its fastest sample sits that much low.)
    mp_ms = {op: min(mp["ms"][op]) for op in OPS}
    cp_ms = {op: min(cp[op]) * 1e3 for op in OPS}
    # The hot path: pool value times (1 + m n), then sign and encode. The naive
    # meter does the same plus a full r^n per reading.
    hot_ms = mp_ms["encrypt"] + mp_ms["reading"]
    naive_ms = mp_ms["full_pow"] + hot_ms
    heap_kib = smallest_heap_kib(n, cycles=2 if args.quick else 5, timeout=timeout)
    emit(NAME, {
        "bench": NAME,
        "quick": args.quick,
        "hot_path_ms": round(hot_ms, 3),
        "naive_ms": round(naive_ms, 3),
        "hot_path_speedup": round(naive_ms / hot_ms, 1),
        "refill_speedup": round(mp_ms["full_pow"] / mp_ms["djn_refill"], 2),
        "comb_vs_pow": round(mp_ms["djn_pow"] / mp_ms["djn_refill"], 2),
        "boot_ms": round(mp["boot_ms"], 1),
        "boot_steps": mp["boot_steps"],
        "step_max_ms": round(mp["step_max_ms"], 2),
        "djn_exp_bits": default_exp_bits(n.bit_length()),
        "peak_heap_bytes": heap_kib * 1024,
        "peak_heap_what": f"smallest -X heapsize running boot (key, pool of {POOL}) and readings with refills",
        "modulus_bits": n.bit_length(),
        "signed_bytes_len": mp["signed_bytes_len"],
        "micropython": mp["impl"] + f", Unix port, heap {HEAP}",
        "mp_reps": mp_reps,
        "cpython_reps": cp_reps,
        "micropython_ms": {op: round(v, 3) for op, v in mp_ms.items()},
        "cpython_ms": {op: round(v, 4) for op, v in cp_ms.items()},
        "micropython_vs_cpython": {op: round(mp_ms[op] / cp_ms[op], 1) for op in OPS},
        "micropython_vs_cpython_sign": round(mp_ms["sign"] / cp_ms["sign"], 1),
        "djn_refill_vs_full_pow": round(mp_ms["djn_refill"] / mp_ms["full_pow"], 3),
        "cpython_djn_refill_vs_full_pow": round(cp_ms["djn_refill"] / cp_ms["full_pow"], 3),
        # Per 15-minute interval the meter refills one pool value and makes one reading;
        # the online encryption is left out as it is a single multiply (see "encrypt").
        "duty_cycle_15min": round((mp_ms["djn_refill"] + mp_ms["reading"]) / (INTERVAL_S * 1e3), 6),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
