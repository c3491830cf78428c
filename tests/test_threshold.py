"""Threshold Paillier: every t-subset decrypts what phe and the meters encrypt, fewer
cannot, each bad partial is caught and its trustee named; the ceremony CLI writes
a real 2048-bit key without ever writing the private key."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import secrets
import stat
import subprocess
import sys

import gmpy2
import pytest
from phe import paillier as phe_paillier

from coordinator.numtheory import multiexp, safe_prime as _safe_prime
from coordinator.threshold import (BadPartial, KeyShare, NotEnoughShares, PartialBatch, ThresholdError,
                                   ThresholdPublicKey, _deal, _interpolate, ceremony, load_share,
                                   load_threshold_public, safe_prime)
from gridledger.errors import GridledgerError
from gridledger.paillier import add_ciphertexts, encrypt_raw, load_public
from gridledger.wire import SLOT_BITS, pack_slots, unpack_slots

SHAPES = [(1, 1), (2, 3), (3, 5)]  # (t, l)
SLOT_MAX = (1 << SLOT_BITS) - 1


@dataclasses.dataclass
class Dealt:
    pub: ThresholdPublicKey
    shares: list[KeyShare]
    priv: phe_paillier.PaillierPrivateKey  # the whole key, known only because the test chose p, q


def deal(t: int, l: int, bits: int = 512) -> Dealt:
    p = q = safe_prime(bits // 2)
    while q == p:
        q = safe_prime(bits // 2)
    pub, shares = _deal(p, q, l, t, ())
    return Dealt(pub, shares, phe_paillier.PaillierPrivateKey(phe_paillier.PaillierPublicKey(p * q), p, q))


@pytest.fixture(scope="module")
def keys() -> dict[tuple[int, int], Dealt]:
    return {shape: deal(*shape) for shape in SHAPES}


@pytest.fixture(scope="module")
def k35(keys) -> Dealt:
    return keys[(3, 5)]


def plaintexts(n: int) -> list[int]:
    return [0, 1, n - 1, secrets.randbelow(n), secrets.randbelow(n),
            pack_slots({s: SLOT_MAX for s in range((n.bit_length() - 1) // SLOT_BITS)}),  # every slot n holds
            pack_slots({0: 1234, 1: 56, 6: 789012, 9: 3})]


def inv_4delta2(pub: ThresholdPublicKey) -> int:
    return int(gmpy2.invert(4 * pub.delta ** 2, pub.n))


# -- safe primes and the ceremony ----------------------------------------------------

@pytest.mark.parametrize("bits", [64, 256, 512, 1024])
def test_safe_prime_is_a_safe_prime_of_exactly_the_size(bits):
    """p and (p-1)/2 are prime, p has `bits` bits with the top two set; progress is reported."""
    tried = []
    p = safe_prime(bits, tried.append)
    assert p.bit_length() == bits and p >> (bits - 2) == 0b11
    assert gmpy2.is_prime(p, 50) and gmpy2.is_prime((p - 1) // 2, 50)
    assert tried and tried == sorted(tried)
    assert safe_prime is _safe_prime


@pytest.mark.parametrize("count", [1, 3, 64, 300])
def test_multiexp_equals_the_product_of_powers(count):
    """The batch weights' bucket multi-exponentiation against one powmod per base,
    with the edge exponents 0, 1 and 2^128 - 1 included."""
    mod = safe_prime(256) * safe_prime(256)
    mod *= mod
    bases = [secrets.randbelow(mod) for _ in range(count)]
    exps = [secrets.randbits(128) for _ in range(count)]
    exps[:3] = [(1 << 128) - 1, 0, 1][:count]
    expect = 1
    for b, e in zip(bases, exps):
        expect = expect * pow(b, e, mod) % mod
    assert multiexp(bases, exps, mod, 128) == expect


def test_safe_prime_refuses_tiny_sizes():
    with pytest.raises(ValueError):
        safe_prime(32)


def test_ceremony_with_the_test_flag_deals_a_working_key():
    """A 512-bit ceremony (test flag): n has 512 bits, each share matches its vk, names kept, 2 of 3 decrypt."""
    stages = []
    pub, shares = ceremony(3, 2, 512, names=("ann", "bo", "cy"), progress=lambda s, k: stages.append(s),
                           insecure_test_bits=True)
    assert pub.n.bit_length() == 512 and (pub.threshold, pub.trustees) == (2, 3)
    assert [s.name for s in shares] == ["ann", "bo", "cy"] and [s.index for s in shares] == [1, 2, 3]
    assert {"p", "q", "deal"} == set(stages) and stages[-1] == "deal"
    for s in shares:
        s.check()
    m = pack_slots({0: 500, 3: 7})
    c = [encrypt_raw(pub.n, m)]
    assert pub.combine(c, [shares[2].partial_batch(c), shares[0].partial_batch(c)]).plaintexts == (m,)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(trustees=3, threshold=2, bits=1024), "insecure_bits"),
    (dict(trustees=3, threshold=2, bits=512), "insecure_bits"),
    (dict(trustees=3, threshold=2, bits=513, insecure_test_bits=True), "insecure_bits"),
    (dict(trustees=3, threshold=4, bits=512, insecure_test_bits=True), "bad_parameters"),
    (dict(trustees=3, threshold=0, bits=512, insecure_test_bits=True), "bad_parameters"),
    (dict(trustees=0, threshold=0, bits=512, insecure_test_bits=True), "bad_parameters"),
    (dict(trustees=65, threshold=2, bits=512, insecure_test_bits=True), "bad_parameters"),
    (dict(trustees=2, threshold=2, bits=512, names=("a", "a"), insecure_test_bits=True), "bad_parameters"),
    (dict(trustees=2, threshold=2, bits=512, names=("a", "../b"), insecure_test_bits=True), "bad_parameters"),
    (dict(trustees=2, threshold=2, bits=512, names=("a",), insecure_test_bits=True), "bad_parameters"),
    (dict(trustees="3", threshold=2, bits=512, insecure_test_bits=True), "bad_parameters"),
])
def test_ceremony_refuses_bad_parameters(kwargs, reason):
    """t out of 1..l, short or odd moduli without the test flag, bad names: a typed error, no key."""
    with pytest.raises(ThresholdError) as exc:
        ceremony(**kwargs)
    assert exc.value.reason == reason and isinstance(exc.value, GridledgerError)


# -- decryption ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_every_t_subset_decrypts_what_phe_and_the_meters_encrypt(keys, shape):
    """Ciphertexts from gridledger.encrypt_raw and from phe's raw_encrypt, and random
    units of Z*_(n^2): every t-subset of trustees gets exactly phe's full-key decryption."""
    k = keys[shape]
    n = k.pub.n
    ms = plaintexts(n)
    phe_pub = phe_paillier.PaillierPublicKey(n)
    cs = ([encrypt_raw(n, m) for m in ms] + [phe_pub.raw_encrypt(m) for m in ms]
          + [secrets.randbelow(n * n) | 1 for _ in range(3)])
    cs = [c for c in cs if gmpy2.gcd(c, n) == 1]
    expect = [k.priv.raw_decrypt(c) for c in cs]
    assert expect[:2 * len(ms)] == ms + ms
    batches = [s.partial_batch(cs) for s in k.shares]
    assert all(k.pub.verify(cs, b) for b in batches)
    for subset in itertools.combinations(batches, k.pub.threshold):
        result = k.pub.combine(cs, list(subset))
        assert list(result.plaintexts) == expect
        assert result.used == tuple(b.index for b in subset) and result.bad == {}


def test_all_trustees_answering_uses_the_first_t_valid(k35):
    cs = [encrypt_raw(k35.pub.n, 77)]
    result = k35.pub.combine(cs, [s.partial_batch(cs) for s in reversed(k35.shares)])
    assert result.plaintexts == (77,) and result.used == (1, 2, 3)


@pytest.mark.parametrize("shape", SHAPES)
def test_products_of_ciphertexts_decrypt_to_slotwise_sums(keys, shape):
    """A bill is a product of readings: its threshold decryption unpacks to the slot sums."""
    k = keys[shape]
    readings = [{0: secrets.randbelow(5000), 1: secrets.randbelow(900), 9: secrets.randbelow(10 ** 6)}
                for _ in range(20)]
    total = add_ciphertexts(k.pub.n, (encrypt_raw(k.pub.n, pack_slots(r)) for r in readings))
    cs = [total]
    [m] = k.pub.combine(cs, [s.partial_batch(cs) for s in k.shares[:k.pub.threshold]]).plaintexts
    slots = unpack_slots(m)
    for s in range(16):
        assert slots[s] == sum(r.get(s, 0) for r in readings)


@pytest.mark.parametrize("shape", [(2, 3), (3, 5)])
def test_t_minus_one_trustees_cannot_decrypt(keys, shape):
    """t-1 valid partials: NotEnoughShares; and the combining formula over them gives a wrong value."""
    k = keys[shape]
    t, n = k.pub.threshold, k.pub.n
    ms = [secrets.randbelow(n) for _ in range(4)]
    cs = [encrypt_raw(n, m) for m in ms]
    batches = [s.partial_batch(cs) for s in k.shares]
    for subset in itertools.combinations(batches, t - 1):
        with pytest.raises(NotEnoughShares) as exc:
            k.pub.combine(cs, list(subset))
        assert (exc.value.have, exc.value.need, exc.value.bad) == (t - 1, t, {})
        cprimes = _interpolate(k.pub, {b.index: b.values for b in subset})
        wrong = [(c - 1) // n * inv_4delta2(k.pub) % n for c in cprimes]
        assert all(w != m for w, m in zip(wrong, ms))
    with pytest.raises(NotEnoughShares):
        k.pub.combine(cs, [])


# -- bad partials: caught, and the right trustee named -----------------------------------

@pytest.fixture(scope="module")
def batch35(k35):
    cs = [encrypt_raw(k35.pub.n, m) for m in plaintexts(k35.pub.n)]
    return cs, [s.partial_batch(cs) for s in k35.shares]


def replace_value(b: PartialBatch, j: int, value: int) -> PartialBatch:
    vals = list(b.values)
    vals[j] = value
    return dataclasses.replace(b, values=tuple(vals))


def test_a_tampered_partial_value_is_caught_and_its_trustee_named(k35, batch35):
    """One c_i changed in one trustee's batch: that batch is rejected (trustee named);
    the four others still decrypt; with only two others left, NotEnoughShares names it."""
    cs, batches = batch35
    nsq = k35.pub.nsquare
    for who, j in [(1, 0), (3, 4), (5, len(cs) - 1)]:
        b = batches[who - 1]
        forged = replace_value(b, j, b.values[j] * k35.pub.v % nsq)  # still a unit, wrong value
        assert not k35.pub.verify(cs, forged)
        mixed = [forged if x.index == who else x for x in batches]
        result = k35.pub.combine(cs, mixed)
        assert result.bad == {who: "bad_proof"} and who not in result.used
        assert list(result.plaintexts) == [k35.priv.raw_decrypt(c) for c in cs]
        with pytest.raises(BadPartial) as exc:
            result.raise_for_bad()
        assert exc.value.trustees == (who,) and exc.value.reason == "bad_proof"
        others = [x for x in batches if x.index != who][:2]
        with pytest.raises(NotEnoughShares) as exc:
            k35.pub.combine(cs, others + [forged])
        assert exc.value.bad == {who: "bad_proof"} and exc.value.have == 2


@pytest.mark.parametrize("field_name, delta", [("e", 1), ("z", 1), ("z", -1), ("e", -1)])
def test_a_tampered_proof_is_caught_and_its_trustee_named(k35, batch35, field_name, delta):
    cs, batches = batch35
    b = batches[1]
    forged = dataclasses.replace(b, **{field_name: getattr(b, field_name) + delta})
    result = k35.pub.combine(cs, [batches[0], forged, batches[2], batches[3]])
    assert result.bad == {2: "bad_proof"} and result.used == (1, 3, 4)


def test_errors_chosen_to_cancel_under_the_weights_are_caught(k35, batch35):
    """A trustee who knew the weights rho before fixing its values could send
    c_1 v^rho_2 and c_2 v^-rho_1, whose errors cancel in D. The weights hash the
    values sent, so the forged values get other weights and the proof fails."""
    cs, batches = batch35
    share, pub = k35.shares[1], k35.pub
    nsq = pub.nsquare
    honest = list(batches[1].values)
    rho = pub._weights(2, cs, honest)
    forged = [honest[0] * pow(pub.v, rho[1], nsq) % nsq, honest[1] * pow(pub.v, -rho[0], nsq) % nsq] + honest[2:]
    assert pub._weighted(2, cs, honest)[1] == (  # the errors do cancel under the honest weights
        math.prod(pow(f, 2 * r, nsq) for f, r in zip(forged, rho)) % nsq)
    b = share._prove(cs, forged)
    assert not pub.verify(cs, b)
    assert pub.verify(cs, share._prove(cs, honest))


def test_two_cheaters_are_both_named(k35, batch35):
    cs, batches = batch35
    forged2 = dataclasses.replace(batches[1], z=batches[1].z + 1)
    forged4 = replace_value(batches[3], 2, 1)
    with pytest.raises(NotEnoughShares) as exc:
        k35.pub.combine(cs, [batches[0], forged2, batches[2], forged4])
    assert exc.value.bad == {2: "bad_proof", 4: "bad_proof"}
    result = k35.pub.combine(cs, [batches[0], forged2, batches[2], forged4, batches[4]])
    assert result.bad == {2: "bad_proof", 4: "bad_proof"} and result.used == (1, 3, 5)
    with pytest.raises(BadPartial) as exc:
        result.raise_for_bad()
    assert exc.value.trustees == (2, 4)


def test_partials_for_other_ciphertexts_or_order_are_rejected(k35, batch35):
    """A valid batch for other ciphertexts, or for the same ones in another order, does not verify."""
    cs, batches = batch35
    other = [encrypt_raw(k35.pub.n, 5)] + cs[1:]
    b_other = k35.shares[0].partial_batch(other)
    assert k35.pub.verify(other, b_other) and not k35.pub.verify(cs, b_other)
    swapped = cs[1::-1] + cs[2:]
    assert not k35.pub.verify(swapped, batches[0])
    result = k35.pub.combine(cs, [b_other] + batches[1:4])
    assert result.bad == {1: "bad_proof"} and result.used == (2, 3, 4)


def test_a_batch_relabelled_as_another_trustee_is_rejected(k35, batch35):
    cs, batches = batch35
    relabelled = dataclasses.replace(batches[1], index=5)
    assert not k35.pub.verify(cs, relabelled)
    assert k35.pub.combine(cs, batches[:4] + [relabelled]).bad == {5: "bad_proof"}


def test_a_batch_under_another_key_is_rejected(k35):
    other = deal(3, 5)
    cs = [encrypt_raw(k35.pub.n, 9)]
    foreign = other.shares[0].partial_batch([encrypt_raw(other.pub.n, 9)])
    assert not k35.pub.verify(cs, foreign)


def test_even_a_negated_partial_is_rejected(k35, batch35):
    """-c_i mod n^2 has the same square, the only thing combining uses; the weights hash
    the exact values sent, so the proof still fails: what was sent is what was proved."""
    cs, batches = batch35
    nsq = k35.pub.nsquare
    neg = replace_value(batches[0], 0, nsq - batches[0].values[0])
    assert pow(neg.values[0], 2, nsq) == pow(batches[0].values[0], 2, nsq)
    result = k35.pub.combine(cs, [neg] + batches[1:4])
    assert result.bad == {1: "bad_proof"} and list(result.plaintexts) == plaintexts_of(k35, cs)


def plaintexts_of(k: Dealt, cs: list[int]) -> list[int]:
    return [k.priv.raw_decrypt(c) for c in cs]


@pytest.mark.parametrize("mangle, reason", [
    (lambda b, n: replace_value(b, 0, 0), "bad_value"),
    (lambda b, n: replace_value(b, 0, n), "bad_value"),
    (lambda b, n: replace_value(b, 0, n * n + 1), "bad_value"),
    (lambda b, n: dataclasses.replace(b, values=b.values[:-1]), "length_mismatch"),
    (lambda b, n: dataclasses.replace(b, e=1 << 256), "bad_proof"),
    (lambda b, n: dataclasses.replace(b, z=1 << (2 * n.bit_length() + 600)), "bad_proof"),
    (lambda b, n: dataclasses.replace(b, z=-5), "bad_proof"),
])
def test_out_of_range_partials_are_named_with_their_reason(k35, batch35, mangle, reason):
    cs, batches = batch35
    bad = mangle(batches[2], k35.pub.n)
    with pytest.raises(BadPartial) as exc:
        k35.pub.check(cs, bad)
    assert exc.value.trustees == (3,) and exc.value.reason == reason
    assert not k35.pub.verify(cs, bad)
    assert k35.pub.combine(cs, batches[:2] + [bad] + batches[3:]).bad == {3: reason}


def test_bad_requests_are_typed_errors(k35, batch35):
    """Invalid ciphertexts, an empty batch, unknown or repeated trustees: ThresholdError with a reason."""
    cs, batches = batch35
    n = k35.pub.n
    share = k35.shares[0]
    for bad_cs, reason in [([], "empty_batch"), ([0], "bad_ciphertext"), ([n], "bad_ciphertext"),
                           ([n * n], "bad_ciphertext"), ([-1], "bad_ciphertext"), ("ab", "bad_ciphertext"),
                           ([True], "bad_ciphertext"), ([1.0], "bad_ciphertext")]:
        with pytest.raises(ThresholdError) as exc:
            share.partial_batch(bad_cs)
        assert exc.value.reason == reason
        with pytest.raises(ThresholdError) as exc:
            k35.pub.combine(bad_cs, batches)
        assert exc.value.reason == reason
        assert not k35.pub.verify(bad_cs, batches[0])
    with pytest.raises(ThresholdError) as exc:
        k35.pub.combine(cs, [batches[0], batches[1], batches[0]])
    assert exc.value.reason == "duplicate_trustee"
    with pytest.raises(ThresholdError) as exc:
        k35.pub.combine(cs, batches[:3] + [dataclasses.replace(batches[3], index=6)])
    assert exc.value.reason == "unknown_trustee"
    with pytest.raises(ThresholdError) as exc:
        k35.pub.combine(cs, batches[:3] + [batches[3].to_dict()])
    assert exc.value.reason == "malformed"
    assert not k35.pub.verify(cs, None)


# -- serialisation -----------------------------------------------------------------------

def test_dicts_round_trip(k35, batch35):
    _, batches = batch35
    assert ThresholdPublicKey.from_dict(json.loads(json.dumps(k35.pub.to_dict()))) == k35.pub
    assert PartialBatch.from_dict(json.loads(json.dumps(batches[4].to_dict()))) == batches[4]
    share = KeyShare.from_dict(json.loads(json.dumps(k35.shares[3].to_dict())))
    assert share == k35.shares[3] and share.s == k35.shares[3].s
    assert str(k35.shares[3].s) not in repr(k35.shares[3])
    assert k35.pub.to_public().n == k35.pub.n and k35.pub.to_public().kid == k35.pub.kid


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("mangle", [
    lambda d: _without(d, "e"),
    lambda d: _without(d, "values"),
    lambda d: dict(d, index="1"),
    lambda d: dict(d, index=True),
    lambda d: dict(d, e=int(d["e"], 16)),
    lambda d: dict(d, e="0x" + d["e"]),
    lambda d: dict(d, e="-" + d["e"]),
    lambda d: dict(d, e=d["e"].upper() + "A"),
    lambda d: dict(d, z=d["z"][:8] + "_" + d["z"][8:]),
    lambda d: dict(d, z=" " + d["z"]),
    lambda d: dict(d, values="ab"),
    lambda d: dict(d, values=[1, 2]),
    lambda d: dict(d, values=[""]),
    lambda d: dict(d, z="f" * 10000),
    lambda d: [d],
    lambda d: None,
])
def test_malformed_partial_dicts_are_refused(batch35, mangle):
    _, batches = batch35
    with pytest.raises(ThresholdError) as exc:
        PartialBatch.from_dict(mangle(batches[0].to_dict()))
    assert exc.value.reason == "malformed"


@pytest.mark.parametrize("mangle, reason", [
    (lambda d: _without(d, "n"), "malformed"),
    (lambda d: dict(d, n=int(d["n"])), "malformed"),
    (lambda d: dict(d, n="-" + d["n"]), "malformed"),
    (lambda d: dict(d, threshold=6), "bad_key"),
    (lambda d: dict(d, threshold=0), "bad_key"),
    (lambda d: dict(d, threshold="3"), "malformed"),
    (lambda d: dict(d, vks=d["vks"][:-1]), "bad_key"),
    (lambda d: dict(d, vks=d["vks"][:-1] + ["0"]), "bad_key"),
    (lambda d: dict(d, v="1"), "bad_key"),
    (lambda d: dict(d, vks="12"), "malformed"),
    (lambda d: dict(d, names=["a", "b", "c", "d", "a"]), "bad_key"),
    (lambda d: dict(d, names=["a", "b", "c", "d", "e/f"]), "bad_key"),
    (lambda d: dict(d, names="abcde"), "malformed"),
    (lambda d: dict(d, kid="00" * 8), "kid_mismatch"),
    (lambda d: "key", "malformed"),
])
def test_malformed_public_key_dicts_are_refused(k35, mangle, reason):
    with pytest.raises(ThresholdError) as exc:
        ThresholdPublicKey.from_dict(mangle(k35.pub.to_dict()))
    assert exc.value.reason == reason


@pytest.mark.parametrize("mangle, reason", [
    (lambda d: dict(d, s=str(int(d["s"]) + 1)), "bad_share"),
    (lambda d: dict(d, index=2), "bad_share"),
    (lambda d: dict(d, index=9), "bad_share"),
    (lambda d: dict(d, name="someone"), "bad_share"),
    (lambda d: dict(d, kid="11" * 8), "kid_mismatch"),
    (lambda d: dict(d, s=-1), "malformed"),
    (lambda d: dict(d, s="0"), "bad_share"),
    (lambda d: _without(d, "public"), "malformed"),
    (lambda d: dict(d, public="x"), "malformed"),
])
def test_malformed_or_mismatched_share_dicts_are_refused(k35, mangle, reason):
    """A share that does not match its verification key (or its name, kid, index) is refused on load."""
    with pytest.raises(ThresholdError) as exc:
        KeyShare.from_dict(mangle(k35.shares[0].to_dict()))
    assert exc.value.reason == reason


# -- the ceremony command, for real ----------------------------------------------------------

def gl(*args) -> subprocess.CompletedProcess:
    # umask 0: the share files must be 0600 because they are created so, not by luck of the umask.
    return subprocess.run([sys.executable, "-m", "gridledger", *args], capture_output=True, text=True,
                          timeout=240, preexec_fn=lambda: os.umask(0))


def digest_tree(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_keys_ceremony_deals_a_real_2048_bit_key(tmp_path):
    """`gridledger keys ceremony`: the public key loads unchanged, phe encrypts under
    it, 2 of 3 loaded shares decrypt; shares are 0600; no private key is written;
    it refuses to overwrite and refuses short moduli."""
    out = tmp_path / "keys"
    res = gl("keys", "ceremony", "--trustees", "3", "--threshold", "2", "--out", str(out),
             "--names", "alice,bob,carol")
    assert res.returncode == 0, res.stderr
    assert "safe prime p" in res.stderr and "dealing shares" in res.stderr

    names = ["alice", "bob", "carol"]
    assert set(digest_tree(out)) == {"paillier.pub.json", "threshold.pub.json",
                                     *(f"trustees/{s}.share.json" for s in names)}
    for s in names:
        assert stat.S_IMODE(os.stat(out / "trustees" / f"{s}.share.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / "trustees").st_mode) == 0o700
    # Only these fields are written: no p, q, m, d or lambda anywhere.
    assert set(json.loads((out / "paillier.pub.json").read_text())) == {"n", "kid", "bits"}
    tpub = json.loads((out / "threshold.pub.json").read_text())
    assert set(tpub) == {"format", "n", "kid", "bits", "threshold", "trustees", "v", "vks", "names"}
    for s in names:
        assert set(json.loads((out / "trustees" / f"{s}.share.json").read_text())) == {
            "format", "warning", "index", "name", "kid", "s", "public"}

    pk = load_public(out / "paillier.pub.json")
    pub = load_threshold_public(out / "threshold.pub.json")
    assert pk.n == pub.n and pk.bits == 2048 and pk.kid == pub.kid and pub.kid in res.stdout
    assert (pub.threshold, pub.trustees, pub.names) == (2, 3, tuple(names))
    shares = {s: load_share(out / "trustees" / f"{s}.share.json") for s in names}
    assert [shares[s].index for s in names] == [1, 2, 3]

    phe_pub = phe_paillier.PaillierPublicKey(pk.n)
    m1 = pack_slots({0: 123456, 1: 789, 14: SLOT_MAX})
    m2 = secrets.randbelow(phe_pub.max_int)
    cs = [phe_pub.encrypt(m1).ciphertext(), phe_pub.raw_encrypt(m2), encrypt_raw(pk.n, m1)]
    batches = [shares["carol"].partial_batch(cs), shares["alice"].partial_batch(cs)]
    result = pub.combine(cs, batches)
    assert result.plaintexts == (m1, m2, m1) and result.used == (1, 3)
    assert unpack_slots(result.plaintexts[0])[14] == SLOT_MAX

    before = digest_tree(out)
    again = gl("keys", "ceremony", "--trustees", "3", "--threshold", "2", "--out", str(out))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert digest_tree(out) == before

    short = gl("keys", "ceremony", "--trustees", "3", "--threshold", "2", "--out", str(tmp_path / "short"),
               "--bits", "1024")
    assert short.returncode == 2 and "at least 2048" in short.stderr
    assert not (tmp_path / "short").exists()


def test_write_ceremony_refuses_to_overwrite_a_share(tmp_path):
    """An existing share file stops the whole write before anything is created."""
    from coordinator.threshold import write_ceremony
    pub, shares = ceremony(2, 2, 256, insecure_test_bits=True)
    (tmp_path / "trustees").mkdir()
    (tmp_path / "trustees" / "trustee2.share.json").write_text("{}")
    with pytest.raises(ThresholdError) as exc:
        write_ceremony(tmp_path, pub, shares)
    assert exc.value.reason == "exists"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["trustee2.share.json", "trustees"]
    with pytest.raises(ThresholdError) as exc:
        write_ceremony(tmp_path / "other", pub, shares[:1])
    assert exc.value.reason == "bad_share"
    paths = write_ceremony(tmp_path / "fresh", pub, shares)
    assert load_share(paths["shares"]["trustee2"]) == shares[1]
