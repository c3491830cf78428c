"""Threshold Paillier at 2048 bits, 3 of 5 trustees: one trustee's partial decryption
(alone, and per ciphertext in a batch of 64 with one proof) and the combiner's work
per ciphertext (every batch proof checked), against one ordinary full-key
decryption (phe's CRT raw_decrypt) of the same modulus size, measured in this run."""

from __future__ import annotations

import json
import secrets
import time

from phe import paillier as phe_paillier

from coordinator.threshold import ceremony
from gridledger.paillier import encrypt_raw
from gridledger.wire import pack_slots

from benchlib import TEST_KEY, emit, machine, median, parse_args, round_robin

NAME = "threshold"
BITS = 2048
TRUSTEES, THRESHOLD = 5, 3
BATCH = 64


def bill() -> int:
    """A plausible summed reading: import and export in a few tariff bands (Wh)."""
    return pack_slots({2 * b + d: secrets.randbelow(10 ** 7) for b in range(4) for d in (0, 1)})


def main() -> None:
    args = parse_args(__doc__)
    reps = 3 if args.quick else 9

    t0 = time.perf_counter()
    pub, shares = ceremony(TRUSTEES, THRESHOLD, BITS)
    keygen_s = time.perf_counter() - t0
    ms = [bill() for _ in range(BATCH)]
    cs = [encrypt_raw(pub.n, m) for m in ms]
    one = cs[:1]
    signers = shares[:THRESHOLD]
    batches = [s.partial_batch(cs) for s in signers]
    singles = [s.partial_batch(one) for s in signers]
    # The timed code must do the real work: the combined plaintexts are the ones encrypted.
    if list(pub.combine(cs, batches).plaintexts) != ms or pub.combine(one, singles).plaintexts != (ms[0],):
        raise AssertionError("threshold decryption does not give back the plaintexts")

    key = json.loads(TEST_KEY.read_text())
    phe_pub = phe_paillier.PaillierPublicKey(int(key["n"]))
    priv = phe_paillier.PaillierPrivateKey(phe_pub, int(key["p"]), int(key["q"]))
    c_base = encrypt_raw(phe_pub.n, ms[0])
    if priv.raw_decrypt(c_base) != ms[0]:
        raise AssertionError("baseline decryption is wrong")

    times = round_robin({
        "partial_1": (lambda: signers[0].partial_batch(one), 5),
        "partial_batch": (lambda: signers[0].partial_batch(cs), 1),
        "combine_1": (lambda: pub.combine(one, singles), 5),
        "combine_batch": (lambda: pub.combine(cs, batches), 1),
        "decrypt": (lambda: priv.raw_decrypt(c_base), 100),
    }, reps)
    ms_each = {k: median(v) * 1e3 for k, v in times.items()}
    partial_batch = ms_each["partial_batch"] / BATCH
    combine_batch = ms_each["combine_batch"] / BATCH
    decrypt = ms_each["decrypt"]
    emit(NAME, {
        "bench": NAME, "quick": args.quick, "reps": reps, "bits": BITS, "threshold": THRESHOLD,
        "trustees": TRUSTEES, "batch": BATCH, "machine": machine(),
        "keygen_s": round(keygen_s, 2),
        "partial_1_ms": round(ms_each["partial_1"], 2),
        "partial_batch_ms_per_ciphertext": round(partial_batch, 2),
        "combine_1_ms": round(ms_each["combine_1"], 2),
        "combine_batch_ms_per_ciphertext": round(combine_batch, 2),
        "baseline_decrypt_ms": round(decrypt, 3),
        "ratio_partial_to_decrypt": round(ms_each["partial_1"] / decrypt, 1),
        "ratio_partial_batch_to_decrypt": round(partial_batch / decrypt, 1),
        # All the CPU one threshold decryption costs (t trustees and the combiner) per
        # ciphertext in batches of 64, against the one full-key decryption it replaces.
        "ratio_threshold_total_to_decrypt": round((THRESHOLD * partial_batch + combine_batch) / decrypt, 1),
    })


if __name__ == "__main__":
    main()
