"""Throughput of the gateway's per-reading checks (Ingest.check, no MQTT or SQLite),
against bare Ed25519 verification of the same bytes: the floor the checks cannot beat."""

from __future__ import annotations

import hashlib
import time
from functools import partial

from aggregator.ingest import Ingest
from aggregator.registry import MeterEntry, Registry
from gridledger.meterkeys import MeterKey, verifier
from gridledger.paillier import PublicKey, encrypt_raw, in_ciphertext_space
from gridledger.wire import ZERO_HASH, Reading, kid_of, make_reading, pack_slots

from benchlib import emit, load_test_modulus, machine, median, parse_args, timed

NAME = "gateway_checks"
T0 = 1795160700  # a quarter-hour boundary; the gateway clock is pinned to the last reading's end
# Distinct ciphertexts are costly to make (one full r^n mod n^2 each) and the
# checks cost the same for any valid one, so readings cycle through a few.
CIPHERTEXTS = 16
CHUNK = 50  # readings per turn when the timed loops alternate


def build_readings(n: int, meters: int, count: int) -> tuple[list[MeterKey], list[Reading]]:
    """`count` readings, round-robin over `meters` meters, each validly signed and
    chained to its meter's previous reading, so every one is a fresh accept."""
    keys = [MeterKey(f"bench-{i:04d}", hashlib.sha256(b"gridledger bench meter %d" % i).digest())
            for i in range(meters)]
    cts = [encrypt_raw(n, pack_slots({0: 800 + i, 1: i})) for i in range(CIPHERTEXTS)]
    kid = kid_of(n)
    prev = [ZERO_HASH] * meters
    out = []
    for i in range(count):
        j, seq = i % meters, i // meters + 1
        r = make_reading(meter=keys[j].meter, seq=seq, t=T0 + 900 * (seq - 1), dt=900, prev=prev[j],
                         kid=kid, c=cts[i % CIPHERTEXTS], sign=keys[j].sign)
        prev[j] = r.hash
        out.append(r)
    return keys, out


def main() -> None:
    args = parse_args(__doc__)
    count, meters, reps = (2000, 20, 3) if args.quick else (10000, 100, 7)
    n = load_test_modulus()
    pk = PublicKey(n)

    t_setup = time.perf_counter()
    keys, readings = build_readings(n, meters, count)
    registry = Registry([MeterEntry(k.meter, f"acct-{k.meter}", k.public_hex) for k in keys])
    payloads = [(r.meter, r.to_json()) for r in readings]
    # Public keys are parsed once per meter, as the registry does.
    pubs = {k.meter: verifier(k.public_hex) for k in keys}
    triples = [(pubs[r.meter], bytes.fromhex(r.sig), r.signed_bytes) for r in readings]
    cints = [r.ciphertext for r in readings]
    last_t = float(max(r.t for r in readings))
    setup_s = time.perf_counter() - t_setup

    def checks(ingest: Ingest, lo: int, hi: int) -> None:
        for meter, payload in payloads[lo:hi]:
            ingest.check(meter, payload)

    def verify(lo: int, hi: int) -> None:
        for pub, sig, msg in triples[lo:hi]:
            pub(msg, sig)

    def range_check(lo: int, hi: int) -> None:
        for c in cints[lo:hi]:
            if not in_ciphertext_space(n, c):
                raise AssertionError("ciphertext out of range")

    # Load from elsewhere comes in bursts, so the three loops take turns in small chunks:
    # a burst then lands on all of them alike and the per-rep ratio stays steady.
    reps_s = []
    for _ in range(reps):
        # A fresh Ingest each rep: chain heads start empty, so every reading is new.
        ingest = Ingest(registry, pk, {}, lambda meter, seq: None, now=lambda: last_t)
        loops = (partial(checks, ingest), verify, range_check)
        tot = [0.0] * len(loops)
        for lo in range(0, count, CHUNK):
            for i, loop in enumerate(loops):
                tot[i] += timed(loop, lo, lo + CHUNK)
        # Ingest counts each verdict by reason or kind: all accepts means no other key.
        if dict(ingest.counts) != {"accept": count}:
            raise AssertionError(f"not every reading was accepted: {dict(ingest.counts)}")
        reps_s.append(tot)
    # Medians over reps; each ratio pairs loops that ran side by side in one rep.
    checks_s, verify_s, range_s = (median([r[i] for r in reps_s]) for i in range(3))
    ratio = median([c / v for c, v, _ in reps_s])
    range_share = median([g / c for c, _, g in reps_s])

    emit(NAME, {
        "bench": NAME,
        "quick": args.quick,
        "readings": count,
        "meters": meters,
        "reps": reps,
        "modulus_bits": n.bit_length(),
        "payload_bytes": round(sum(len(p) for _, p in payloads) / count),
        "setup_s": round(setup_s, 2),
        "checks_per_s": round(count / checks_s),
        "checks_us_per_reading": round(checks_s / count * 1e6, 1),
        "ed25519_verify_per_s": round(count / verify_s),
        "ed25519_verify_us_per_reading": round(verify_s / count * 1e6, 1),
        "range_check_us_per_reading": round(range_s / count * 1e6, 2),
        "range_check_share": round(range_share, 4),
        "ratio_vs_ed25519_verify": round(ratio, 3),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
