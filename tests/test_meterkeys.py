"""The one Ed25519 rule every role applies to meter signatures (`meterkeys.verifier`,
libsodium): it agrees with RFC 8032 signers, and refuses what a lenient verifier
takes (non-canonical S, small-order keys and nonces)."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gridledger.errors import ConfigError
from gridledger.meterkeys import new_meter_key, verifier

L = 2**252 + 27742317777372353535851937790883648493   # the order of the base point
IDENTITY = bytes([1]) + bytes(31)                       # the neutral element, encoded


def openssl_accepts(pub: bytes, msg: bytes, sig: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
        return True
    except InvalidSignature:
        return False


def test_it_agrees_with_the_signers_on_honest_and_tampered_signatures():
    for i in range(200):
        key = new_meter_key(f"m{i}")
        msg = os.urandom(i * 7)
        sig = key.sign(msg)
        verify = verifier(key.public_hex)
        assert verify(msg, sig)
        flipped = bytearray(sig)
        flipped[i % 64] ^= 1 << (i % 8)
        assert not verify(msg, bytes(flipped))
        assert not verify(msg + b"x", sig)
        assert not openssl_accepts(bytes.fromhex(key.public_hex), msg, bytes(flipped))


def test_a_non_canonical_s_is_refused():
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes_raw()
    msg = b"gl-reading-v1\nm1\n1"
    sig = key.sign(msg)
    s = int.from_bytes(sig[32:], "little")
    while s + L >= 2**256:   # S + L must still fit the 32 bytes to be a malleated twin
        msg += b"!"
        sig = key.sign(msg)
        s = int.from_bytes(sig[32:], "little")
    twin = sig[:32] + (s + L).to_bytes(32, "little")
    assert verifier(pub.hex())(msg, sig)
    assert not verifier(pub.hex())(msg, twin)


def test_a_key_anyone_can_sign_for_verifies_nothing():
    """The identity as public key, the identity as R and S = 0 satisfy the
    verification equation for every message. OpenSSL accepts that forgery;
    libsodium refuses small-order keys and nonces, so such a key, enrolled,
    could never get a reading accepted in its meter's name."""
    forged = IDENTITY + bytes(32)
    assert openssl_accepts(IDENTITY, b"any reading at all", forged)   # why the rule changed
    assert not verifier(IDENTITY.hex())(b"any reading at all", forged)


@pytest.mark.parametrize("bad", ["", "ab", "zz" * 32, "00" * 31, "00" * 33])
def test_a_malformed_key_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        verifier(bad)


@pytest.mark.parametrize("sig", [b"", b"x" * 63, b"x" * 65])
def test_a_signature_of_the_wrong_size_is_false_not_an_error(sig):
    key = new_meter_key("m1")
    assert verifier(key.public_hex)(b"msg", sig) is False
