"""Threshold Paillier (Shoup; Damgard-Jurik with s = 1, g = n + 1): t of l trustees
decrypt together and the private key is never assembled. docs/threshold.md has the
maths, the batched proof and the ceremony.

Pure functions over integers and frozen dataclasses; the ceremony's files are
written by `write_ceremony` and read by `load_threshold_public` / `load_share`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping, Sequence

import gmpy2

from gridledger.errors import Rejected
from gridledger.paillier import PublicKey
from gridledger.wire import kid_of

from .numtheory import multiexp, safe_prime

__all__ = [
    "ThresholdError", "BadPartial", "NotEnoughShares",
    "ThresholdPublicKey", "KeyShare", "PartialBatch", "Combined",
    "safe_prime", "ceremony", "write_ceremony", "load_threshold_public", "load_share",
    "MIN_BITS", "MAX_TRUSTEES",
]

MIN_BITS = 2048        # DESIGN section 4: n >= 2048 bits
MIN_TEST_BITS = 128    # floor even with insecure_test_bits: the sieve needs primes of >= 64 bits
# Exponents grow with Delta = l!: 64! has 296 bits. More trustees than this is a
# different design (a committee per area, not one global key).
MAX_TRUSTEES = 64
CHALLENGE_BITS = 256   # e, the Fiat-Shamir challenge
WEIGHT_BITS = 128      # rho_j, the random weights of a batch: a wrong value survives w.p. 2^-128
FORMAT = "gridledger-threshold-paillier-v1"
_TAG_PROOF = FORMAT.encode() + b"/dleq"
_TAG_WEIGHTS = FORMAT.encode() + b"/batch-weights"
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
_HEX_RE = re.compile(r"[0-9a-f]{1,8192}\Z")
_DEC_RE = re.compile(r"[0-9]{1,5000}\Z")


# -- errors ------------------------------------------------------------------------

class ThresholdError(Rejected):
    """A threshold key, share, partial or request refused for a machine-readable `reason`."""


class BadPartial(ThresholdError):
    """Partial decryptions that fail their checks; `trustees` names who sent them."""

    def __init__(self, trustees: Sequence[int], reason: str, detail: str = ""):
        self.trustees = tuple(sorted(trustees))
        who = ", ".join(map(str, self.trustees))
        super().__init__(reason, f"trustee {who}" + (f": {detail}" if detail else ""))


class NotEnoughShares(ThresholdError):
    """Fewer than t valid partial batches; `bad` maps each rejected trustee to its reason."""

    def __init__(self, have: int, need: int, bad: Mapping[int, str] | None = None):
        self.have, self.need, self.bad = have, need, dict(bad or {})
        extra = f"; rejected {self.bad}" if self.bad else ""
        super().__init__("not_enough_shares", f"{have} valid partial batches, {need} needed{extra}")


# -- encodings ---------------------------------------------------------------------

def _is_int(x) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or isinstance(x, gmpy2.mpz)


def _unit(x, n: int, nsq: int) -> bool:
    """x is in Z*_{n^2}."""
    return _is_int(x) and 0 < x < nsq and gmpy2.gcd(x, n) == 1


def _get(obj, key: str, kind: str):
    if not isinstance(obj, dict) or key not in obj:
        raise ThresholdError("malformed", f"missing {key!r}")
    val = obj[key]
    if kind == "int":
        if type(val) is not int:
            raise ThresholdError("malformed", f"{key!r} must be a JSON integer")
        return val
    if kind == "object":
        if not isinstance(val, dict):
            raise ThresholdError("malformed", f"{key!r} must be a JSON object")
        return val
    return _parse_num(val, kind, key)


def _parse_num(val, kind: str, key: str) -> int:
    """kind 'dec' or 'hex': a non-negative integer as a string, nothing else (no sign,
    spaces, underscores or 0x that int() would let through)."""
    rx, base = (_DEC_RE, 10) if kind == "dec" else (_HEX_RE, 16)
    if not isinstance(val, str) or not rx.match(val):
        raise ThresholdError("malformed", f"{key!r} must be a {'decimal' if base == 10 else 'lowercase hex'} string")
    return int(val, base)


def _num_list(obj, key: str, kind: str) -> tuple[int, ...]:
    vals = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(vals, list):
        raise ThresholdError("malformed", f"{key!r} must be a list")
    return tuple(_parse_num(v, kind, f"{key}[{i}]") for i, v in enumerate(vals))


def _transcript(tag: bytes, *items: bytes):
    """SHA-256 over length-prefixed items (fixed-width big-endian integers)."""
    h = hashlib.sha256()
    for item in (tag,) + items:
        h.update(len(item).to_bytes(4, "big"))
        h.update(item)
    return h


# -- keys --------------------------------------------------------------------------

@dataclass(frozen=True)
class ThresholdPublicKey:
    """n, the threshold t of l trustees, v and each trustee's verification key
    vk_i = v^(Delta s_i) mod n^2 (vks[i-1] is trustee i's)."""
    n: int
    threshold: int
    trustees: int
    v: int = field(repr=False)
    vks: tuple[int, ...] = field(repr=False)
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (_is_int(self.n) and self.n > 3 and self.n % 2 == 1):
            raise ThresholdError("bad_key", "n must be an odd integer > 3")
        if not (_is_int(self.v) and isinstance(self.vks, (tuple, list)) and all(map(_is_int, self.vks))):
            raise ThresholdError("bad_key", "v and vks must be integers")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "v", int(self.v))
        object.__setattr__(self, "vks", tuple(int(x) for x in self.vks))
        if not isinstance(self.names, (tuple, list)):
            raise ThresholdError("bad_key", "names must be a sequence of strings")
        object.__setattr__(self, "names", tuple(self.names))
        for what, val in (("threshold", self.threshold), ("trustees", self.trustees)):
            if type(val) is not int:
                raise ThresholdError("bad_key", f"{what} must be an int")
        if not 1 <= self.threshold <= self.trustees <= MAX_TRUSTEES:
            raise ThresholdError("bad_key", f"need 1 <= threshold <= trustees <= {MAX_TRUSTEES}, "
                                            f"not {self.threshold} of {self.trustees}")
        if len(self.vks) != self.trustees:
            raise ThresholdError("bad_key", f"{len(self.vks)} verification keys for {self.trustees} trustees")
        nsq = self.n * self.n
        if self.v == 1 or not all(_unit(x, self.n, nsq) for x in (self.v,) + self.vks):
            raise ThresholdError("bad_key", "v and every verification key must be units mod n^2 (v != 1)")
        if self.names:
            if len(self.names) != self.trustees or len(set(self.names)) != self.trustees:
                raise ThresholdError("bad_key", "names must be one distinct name per trustee")
            if not all(isinstance(s, str) and _NAME_RE.match(s) for s in self.names):
                raise ThresholdError("bad_key", "trustee names must match [A-Za-z0-9_-]{1,32}")

    @cached_property
    def nsquare(self) -> int:
        return self.n * self.n

    @cached_property
    def delta(self) -> int:
        return math.factorial(self.trustees)

    @cached_property
    def kid(self) -> str:
        return kid_of(self.n)

    @cached_property
    def _width(self) -> int:
        return (self.nsquare.bit_length() + 7) // 8

    @cached_property
    def _nonce_bits(self) -> int:
        # r must hide e*Delta*s_i (< 2^256 * Delta * n^2) up to 2^-256: Damgard-Jurik's
        # bitlen(n^2) + 2*256, plus bitlen(Delta) so that holds for any l.
        return self.nsquare.bit_length() + self.delta.bit_length() + 2 * CHALLENGE_BITS

    def name(self, index: int) -> str:
        return self.names[index - 1] if self.names else f"trustee{index}"

    def to_public(self) -> PublicKey:
        return PublicKey(self.n)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "n": str(self.n), "kid": self.kid, "bits": self.n.bit_length(),
                "threshold": self.threshold, "trustees": self.trustees, "v": str(self.v),
                "vks": [str(x) for x in self.vks], "names": list(self.names)}

    @classmethod
    def from_dict(cls, obj) -> ThresholdPublicKey:
        if not isinstance(obj, dict):
            raise ThresholdError("malformed", "a threshold public key is a JSON object")
        names = obj.get("names", [])
        if not isinstance(names, list):
            raise ThresholdError("malformed", "'names' must be a list")
        pub = cls(n=_get(obj, "n", "dec"), threshold=_get(obj, "threshold", "int"),
                  trustees=_get(obj, "trustees", "int"), v=_get(obj, "v", "dec"),
                  vks=_num_list(obj, "vks", "dec"), names=tuple(names))
        if "kid" in obj and obj["kid"] != pub.kid:
            raise ThresholdError("kid_mismatch", f"kid {obj['kid']!r} does not match n ({pub.kid})")
        return pub

    # -- partial decryptions -------------------------------------------------------

    def _check_ciphertexts(self, cs: Sequence[int]) -> list:
        if isinstance(cs, (str, bytes)) or not isinstance(cs, Sequence):
            raise ThresholdError("bad_ciphertext", "give a sequence of ciphertexts")
        if not cs:
            raise ThresholdError("empty_batch", "no ciphertexts to decrypt")
        n, nsq = self.n, self.nsquare
        for k, c in enumerate(cs):
            if not _unit(c, n, nsq):
                raise ThresholdError("bad_ciphertext", f"ciphertext {k} is not in Z*_(n^2)")
        return [gmpy2.mpz(c) for c in cs]

    def _weights(self, index: int, cs: Sequence, values: Sequence) -> list[int]:
        """The 128-bit rho_j: a hash of the key, the trustee, every ciphertext and every
        partial value, so no value can be chosen after (or against) the weights."""
        w = self._width
        h = _transcript(_TAG_WEIGHTS, self.n.to_bytes(w, "big"), self.v.to_bytes(w, "big"),
                        self.vks[index - 1].to_bytes(w, "big"), index.to_bytes(4, "big"),
                        len(cs).to_bytes(4, "big"))
        for x in (*cs, *values):
            h.update(int(x).to_bytes(w, "big"))
        step = WEIGHT_BITS // 8
        stream = hashlib.shake_128(h.digest()).digest(len(cs) * step)
        return [int.from_bytes(stream[j:j + step], "big") for j in range(0, len(stream), step)]

    def _weighted(self, index: int, cs: Sequence, values: Sequence) -> tuple:
        """C = prod (c_j^4)^rho_j and D = prod (c_ij^2)^rho_j."""
        nsq = self.nsquare
        rho = self._weights(index, cs, values)
        C = multiexp(cs, rho, nsq, WEIGHT_BITS)
        D = multiexp([gmpy2.mpz(x) for x in values], rho, nsq, WEIGHT_BITS)
        return gmpy2.powmod(C, 4, nsq), gmpy2.powmod(D, 2, nsq)

    def _challenge(self, index: int, C, D, a, b) -> int:
        w = self._width
        h = _transcript(_TAG_PROOF, self.n.to_bytes(w, "big"), index.to_bytes(4, "big"),
                        *(int(x).to_bytes(w, "big") for x in (C, D, self.v, self.vks[index - 1], a, b)))
        return int.from_bytes(h.digest(), "big")

    def check(self, cs: Sequence[int], batch: PartialBatch) -> None:
        """Raise BadPartial (naming batch.index) unless `batch` holds trustee
        batch.index's correct partial decryption of every ciphertext in `cs`."""
        cs = self._check_ciphertexts(cs)
        if not isinstance(batch, PartialBatch):
            raise ThresholdError("malformed", "not a PartialBatch")
        i = batch.index
        if not 1 <= i <= self.trustees:
            raise BadPartial([i], "unknown_trustee", f"index out of 1..{self.trustees}")
        if len(batch.values) != len(cs):
            raise BadPartial([i], "length_mismatch", f"{len(batch.values)} values for {len(cs)} ciphertexts")
        n, nsq = self.n, self.nsquare
        if not all(_unit(x, n, nsq) for x in batch.values):
            raise BadPartial([i], "bad_value", "a partial value is not in Z*_(n^2)")
        e, z = batch.e, batch.z
        if not (0 <= e < 1 << CHALLENGE_BITS and 0 <= z < 1 << (self._nonce_bits + 1)):
            raise BadPartial([i], "bad_proof", "challenge or response out of range")
        C, D = self._weighted(i, cs, [gmpy2.mpz(x) for x in batch.values])
        # a = C^z D^-e and b = v^z vk_i^-e: what the prover committed to, if honest.
        a = gmpy2.powmod(C, z, nsq) * gmpy2.powmod(D, -e, nsq) % nsq
        b = gmpy2.powmod(self.v, z, nsq) * gmpy2.powmod(self.vks[i - 1], -e, nsq) % nsq
        if self._challenge(i, C, D, a, b) != e:
            raise BadPartial([i], "bad_proof", "the proof of correct decryption does not verify")

    def verify(self, cs: Sequence[int], batch: PartialBatch) -> bool:
        """check() as a bool: False on any bad or malformed input."""
        try:
            self.check(cs, batch)
        except ThresholdError:
            return False
        return True

    def combine(self, cs: Sequence[int], batches: Sequence[PartialBatch]) -> Combined:
        """Decrypt every ciphertext in `cs` from trustees' partial batches.

        Every batch is checked; a failing one is left out and named in `.bad`. The
        t valid batches of lowest index are combined. Raises NotEnoughShares (with
        the rejected ones) when fewer than t are valid, ThresholdError for a bad
        request (invalid ciphertexts, unknown or repeated trustee indices)."""
        cs = self._check_ciphertexts(cs)
        seen = set()
        for b in batches:
            if not isinstance(b, PartialBatch):
                raise ThresholdError("malformed", "not a PartialBatch")
            if not 1 <= b.index <= self.trustees:
                raise ThresholdError("unknown_trustee", f"index {b.index} out of 1..{self.trustees}")
            if b.index in seen:
                raise ThresholdError("duplicate_trustee", f"two batches from trustee {b.index}")
            seen.add(b.index)
        bad, good = {}, []
        for b in sorted(batches, key=lambda b: b.index):
            try:
                self.check(cs, b)
                good.append(b)
            except BadPartial as exc:
                bad[b.index] = exc.reason
        if len(good) < self.threshold:
            raise NotEnoughShares(len(good), self.threshold, bad)
        used = good[:self.threshold]
        inv = gmpy2.invert(4 * self.delta ** 2, self.n)
        plaintexts = []
        for k, cprime in enumerate(_interpolate(self, {b.index: b.values for b in used})):
            if cprime % self.n != 1:  # impossible once every proof checked out
                raise ThresholdError("combine_failed", f"ciphertext {k}: combined value is not 1 mod n")
            plaintexts.append(int((cprime - 1) // self.n * inv % self.n))
        return Combined(tuple(plaintexts), tuple(b.index for b in used), bad)


def _interpolate(pub: ThresholdPublicKey, parts: Mapping[int, Sequence[int]]) -> list:
    """prod_i c_i^(2 mu_i) mod n^2 per ciphertext, mu_i = Delta * prod_{j != i} j/(j-i)
    over exactly the trustees in `parts` (no count check: see combine)."""
    idx = sorted(parts)
    nsq = pub.nsquare
    mus = {}
    for i in idx:
        num, den = pub.delta, 1
        for j in idx:
            if j != i:
                num *= j
                den *= j - i
        assert num % den == 0  # Delta = l! clears every denominator
        mus[i] = 2 * (num // den)
    count = len(parts[idx[0]]) if idx else 0
    out = []
    for k in range(count):
        acc = gmpy2.mpz(1)
        for i in idx:
            acc = acc * gmpy2.powmod(parts[i][k], mus[i], nsq) % nsq  # gmpy2 inverts for mu < 0
        out.append(acc)
    return out


@dataclass(frozen=True)
class Combined:
    """combine()'s result: the plaintexts, the trustees whose partials made them,
    and every trustee whose batch failed, with the reason."""
    plaintexts: tuple[int, ...]
    used: tuple[int, ...]
    bad: dict[int, str] = field(default_factory=dict)

    def raise_for_bad(self) -> None:
        """For callers that treat any failing trustee as fatal."""
        if self.bad:
            reasons = sorted(set(self.bad.values()))
            raise BadPartial(list(self.bad), reasons[0] if len(reasons) == 1 else "bad_partial",
                             ", ".join(f"{i}: {r}" for i, r in sorted(self.bad.items())))


@dataclass(frozen=True)
class PartialBatch:
    """Trustee `index`'s c^(2 Delta s_i) for each ciphertext of a batch and one
    proof (e, z) that all of them are correct."""
    index: int
    values: tuple[int, ...]
    e: int
    z: int

    def __post_init__(self) -> None:
        if type(self.index) is not int:
            raise ThresholdError("malformed", "a partial batch's index must be an int")
        if not isinstance(self.values, (tuple, list)) or not all(map(_is_int, self.values)):
            raise ThresholdError("malformed", "a partial batch's values must be integers")
        if not (_is_int(self.e) and _is_int(self.z)):
            raise ThresholdError("malformed", "a partial batch's proof (e, z) must be integers")
        object.__setattr__(self, "values", tuple(int(x) for x in self.values))
        object.__setattr__(self, "e", int(self.e))
        object.__setattr__(self, "z", int(self.z))

    def to_dict(self) -> dict:
        return {"index": self.index, "values": [format(v, "x") for v in self.values],
                "e": format(self.e, "x"), "z": format(self.z, "x")}

    @classmethod
    def from_dict(cls, obj) -> PartialBatch:
        return cls(index=_get(obj, "index", "int"), values=_num_list(obj, "values", "hex"),
                   e=_get(obj, "e", "hex"), z=_get(obj, "z", "hex"))


def _secret_pow(base, exp: int, mod: int):
    """base^exp for a secret exp > 0 (a share or a proof nonce): GMP's constant-time
    mpz_powm_sec (a partial costs 1.4-1.7x what it does with powmod), so that timing
    leaks neither the share nor the nonce (which, with z, gives the share)."""
    return gmpy2.powmod_sec(base, exp, mod)


@dataclass(frozen=True)
class KeyShare:
    """Trustee `index`'s share s_i = f(i) of d, with the public key it belongs to."""
    index: int
    s: int = field(repr=False)
    public: ThresholdPublicKey

    def __post_init__(self) -> None:
        if not isinstance(self.public, ThresholdPublicKey):
            raise ThresholdError("bad_share", "public must be a ThresholdPublicKey")
        if type(self.index) is not int or not 1 <= self.index <= self.public.trustees:
            raise ThresholdError("bad_share", f"index must be in 1..{self.public.trustees}")
        if not _is_int(self.s) or self.s < 1:
            raise ThresholdError("bad_share", "s must be a positive integer")
        object.__setattr__(self, "s", int(self.s))

    @property
    def name(self) -> str:
        return self.public.name(self.index)

    def check(self) -> None:
        """The share matches its verification key: v^(Delta s_i) = vk_i."""
        pub = self.public
        if _secret_pow(pub.v, pub.delta * self.s, pub.nsquare) != pub.vks[self.index - 1]:
            raise ThresholdError("bad_share", f"share {self.index} does not match its verification key")

    def partial_batch(self, cs: Sequence[int]) -> PartialBatch:
        """c^(2 Delta s_i) for every c, and one Fiat-Shamir proof that
        log_C(D) = log_v(vk_i) for the random-weighted products C, D."""
        pub = self.public
        cs = pub._check_ciphertexts(cs)
        x = pub.delta * self.s
        return self._prove(cs, [_secret_pow(c, 2 * x, pub.nsquare) for c in cs])

    def _prove(self, cs: Sequence, values: Sequence) -> PartialBatch:
        """The proof for `values` as they are (tests hand it forged ones)."""
        pub = self.public
        nsq, x = pub.nsquare, pub.delta * self.s
        C, D = pub._weighted(self.index, cs, values)
        r = 1 + secrets.randbelow((1 << pub._nonce_bits) - 1)
        a, b = _secret_pow(C, r, nsq), _secret_pow(pub.v, r, nsq)
        e = pub._challenge(self.index, C, D, a, b)
        return PartialBatch(self.index, tuple(int(v) for v in values), e, int(r + e * x))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "warning": "SECRET: one trustee's share of the threshold Paillier key.",
                "index": self.index, "name": self.name, "kid": self.public.kid, "s": str(self.s),
                "public": self.public.to_dict()}

    @classmethod
    def from_dict(cls, obj) -> KeyShare:
        share = cls(index=_get(obj, "index", "int"), s=_get(obj, "s", "dec"),
                    public=ThresholdPublicKey.from_dict(_get(obj, "public", "object")))
        if "kid" in obj and obj["kid"] != share.public.kid:
            raise ThresholdError("kid_mismatch", f"share kid {obj['kid']!r} is not its key's {share.public.kid}")
        if "name" in obj and obj["name"] != share.name:
            raise ThresholdError("bad_share", f"share is named {obj['name']!r}, its key says {share.name!r}")
        share.check()
        return share


# -- the ceremony ------------------------------------------------------------------

def ceremony(trustees: int, threshold: int, bits: int = 2048, names: Sequence[str] = (),
             progress: Callable[[str, int], None] | None = None, *,
             insecure_test_bits: bool = False) -> tuple[ThresholdPublicKey, list[KeyShare]]:
    """A trusted dealer's key generation: safe primes p, q; d = 0 mod m, 1 mod n;
    shares s_i = f(i) of a random f of degree t-1 over Z_(nm) with f(0) = d.

    `progress(stage, tried)`: stage "p" or "q" with safe-prime candidates tried so
    far, then "deal". Below 2048 bits only with insecure_test_bits (unit tests)."""
    for what, val in (("trustees", trustees), ("threshold", threshold), ("bits", bits)):
        if type(val) is not int:
            raise ThresholdError("bad_parameters", f"{what} must be an int")
    if not 1 <= threshold <= trustees <= MAX_TRUSTEES:
        raise ThresholdError("bad_parameters", f"need 1 <= threshold <= trustees <= {MAX_TRUSTEES}, "
                                               f"not {threshold} of {trustees}")
    floor = MIN_TEST_BITS if insecure_test_bits else MIN_BITS
    if bits < floor or bits % 2:
        raise ThresholdError("insecure_bits", f"the modulus must have an even number of bits, at least {floor}"
                                              f" (DESIGN section 4), not {bits}")
    names = tuple(names)
    if names and (len(names) != trustees or len(set(names)) != trustees
                  or not all(isinstance(s, str) and _NAME_RE.match(s) for s in names)):
        raise ThresholdError("bad_parameters", "names must be one distinct [A-Za-z0-9_-]{1,32} name per trustee")

    def stage(label: str):
        return (lambda tried: progress(label, tried)) if progress else None

    p = safe_prime(bits // 2, stage("p"))
    q = p
    while q == p:
        q = safe_prime(bits // 2, stage("q"))
    if progress:
        progress("deal", 0)
    assert (p * q).bit_length() == bits  # both primes have their top two bits set
    return _deal(p, q, trustees, threshold, names)


def _deal(p: int, q: int, trustees: int, threshold: int, names: tuple[str, ...]
          ) -> tuple[ThresholdPublicKey, list[KeyShare]]:
    """Shares of d for n = pq, from distinct safe primes p, q (ceremony's second half;
    tests call it with primes they know, to compare against a full-key decryption)."""
    n = p * q
    m = (p // 2) * (q // 2)  # p'q'
    nm = n * m
    d = m * int(gmpy2.invert(m, n))  # d = 0 mod m, d = 1 mod n
    coeffs = [d] + [secrets.randbelow(nm) for _ in range(threshold - 1)]
    shares_s = [sum(a * i ** k for k, a in enumerate(coeffs)) % nm for i in range(1, trustees + 1)]
    # Check the dealing before anything leaves: the first t shares interpolate to Delta*d.
    delta = math.factorial(trustees)
    idx = range(1, threshold + 1)
    lag = sum(delta * math.prod(j for j in idx if j != i) // math.prod(j - i for j in idx if j != i)
              * shares_s[i - 1] for i in idx)
    if (lag - delta * d) % nm:
        raise AssertionError("share dealing failed its interpolation check")
    del p, q, m, d, coeffs, lag  # Python cannot wipe ints; at least hold no references
    nsq = n * n
    while True:
        r = secrets.randbelow(nsq)
        if r > 1 and gmpy2.gcd(r, n) == 1:
            break
    v = int(gmpy2.powmod(r, 2, nsq))
    vks = tuple(int(_secret_pow(v, delta * s, nsq)) for s in shares_s)
    pub = ThresholdPublicKey(n, threshold, trustees, v, vks, names)
    shares = [KeyShare(i, s, pub) for i, s in enumerate(shares_s, start=1)]
    del shares_s, nm
    return pub, shares


def _write_new(path: Path, obj: dict, mode: int) -> None:
    """Create `path` with `mode` from the first byte on; refuse an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def write_ceremony(directory, pub: ThresholdPublicKey, shares: Sequence[KeyShare]) -> dict:
    """Write DIR/paillier.pub.json (the plain public key: gateways and meters use it
    unchanged), DIR/threshold.pub.json and DIR/trustees/NAME.share.json (0600).
    Refuses before writing anything if any of them exists. Returns
    {"paillier_public": path, "threshold_public": path, "shares": {name: path}}."""
    directory = Path(directory)
    if sorted(s.index for s in shares) != list(range(1, pub.trustees + 1)) or any(s.public != pub for s in shares):
        raise ThresholdError("bad_share", "give exactly one share of this key per trustee")
    paths = {"paillier_public": directory / "paillier.pub.json",
             "threshold_public": directory / "threshold.pub.json",
             "shares": {s.name: directory / "trustees" / f"{s.name}.share.json" for s in shares}}
    for path in [paths["paillier_public"], paths["threshold_public"], *paths["shares"].values()]:
        if path.exists():
            raise ThresholdError("exists", f"{path} exists; refusing to overwrite key material")
    (directory / "trustees").mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_new(paths["paillier_public"], {"n": str(pub.n), "kid": pub.kid, "bits": pub.n.bit_length()}, 0o644)
    _write_new(paths["threshold_public"], pub.to_dict(), 0o644)
    for s in shares:
        _write_new(paths["shares"][s.name], s.to_dict(), 0o600)
    return paths


def _read_json(path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ThresholdError("unreadable", f"{path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ThresholdError("malformed", f"{path}: not a JSON object")
    return obj


def load_threshold_public(path) -> ThresholdPublicKey:
    return ThresholdPublicKey.from_dict(_read_json(path))


def load_share(path) -> KeyShare:
    """A trustee's share, checked against its verification key."""
    return KeyShare.from_dict(_read_json(path))
