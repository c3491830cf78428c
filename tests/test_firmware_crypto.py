"""The firmware's cryptography, run under the real MicroPython Unix port and
checked against independent CPython implementations (cryptography, phe)."""

import hashlib
import json
import random
import subprocess

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gridledger.firmware_build import FIRMWARE_SRC, mpy_cross
from gridledger.meterkeys import MeterKey
from gridledger.loadgen import encrypt_with
from gridledger.paillier import encrypt_raw
from gridledger.wire import kid_of, make_reading, pack_slots, parse_reading, unpack_slots

from conftest import MP_SCRIPTS, VECTORS

L = 2**252 + 27742317777372353535851937790883648493  # the Ed25519 group order
from helpers import N, PRIV

READINGS = json.loads((VECTORS / "readings_v1.json").read_text())
assert int(READINGS["paillier"]["n"]) == N  # the vectors use the shared test key


def test_rfc8032_section_7_1_vectors_under_micropython(mp_source):
    """RFC 8032 7.1: the firmware derives every public key and signature exactly."""
    want = json.loads((VECTORS / "rfc8032_7_1.json").read_text())["vectors"]
    got = mp_source.run_json(MP_SCRIPTS / "mp_ed25519_vectors.py", VECTORS / "rfc8032_7_1.json")
    assert [(g["public"], g["signature"]) for g in got] == [(w["public"], w["signature"]) for w in want]


def test_firmware_sha512_matches_hashlib_at_every_padding_length(mp_source):
    """The pure SHA-512 (boards' hashlib lacks it) agrees with CPython's for every tail length,
    hashed whole and fed to update() in uneven pieces (Ed25519 hashes a reading that way)."""
    got = mp_source.run_json(MP_SCRIPTS / "mp_sha512_lengths.py", heap="1m")
    assert len(got) == 263
    for n, (whole, pieces) in got.items():
        msg = bytes((i * 7 + int(n)) & 0xFF for i in range(int(n)))
        assert whole == pieces == hashlib.sha512(msg).hexdigest(), n


def test_comb_base_multiplication_matches_double_and_add(mp_source, tmp_path):
    """The fixed-base comb gives k*B exactly for edge scalars and random ones below 2^255."""
    rnd = random.Random(8032)
    ks = [0, 1, 2, 50, 51, 2**51, 2**204, 2**252 - 1, L - 1, L, 2**254 + 3, 2**255 - 1]
    ks += [rnd.getrandbits(255) for _ in range(12)]
    job = tmp_path / "scalars.json"
    job.write_text(json.dumps([str(k) for k in ks]))
    got = mp_source.run_json(MP_SCRIPTS / "mp_ed25519_base.py", job)
    assert len(got) == len(ks)
    for comb, plain in got:
        assert comb == plain


def test_firmware_encryption_is_the_textbook_paillier_product(mp_source, tmp_path):
    """The firmware's encrypt_with computes rho + n*(m*rho mod n) mod n^2 (no 6-8 kbit product):
    the same ciphertext as the load generator's (1 + m*n)*rho mod n^2 for edge plaintexts and
    pool values, random ones, and rho values that are not reduced mod n^2."""
    rnd = random.Random(2048)
    nsq = N * N
    cases = [(m, r) for m in (0, 1, N - 1, pack_slots({0: 812, 1: 3})) for r in (1, nsq - 1, rnd.randrange(nsq))]
    cases += [(rnd.randrange(N) >> rnd.randrange(2048), rnd.randrange(nsq)) for _ in range(40)]
    cases += [(rnd.randrange(N), nsq + rnd.randrange(nsq)), (5, 3 * nsq)]  # rho above n^2: still reduced
    job = tmp_path / "encrypt.json"
    job.write_text(json.dumps({"n": format(N, "x"), "cases": [[format(m, "x"), format(r, "x")] for m, r in cases]}))
    got = mp_source.run_json(MP_SCRIPTS / "mp_encrypt_with.py", job, heap="1m")
    assert got == [format(encrypt_with(N, m, r), "x") for m, r in cases]


@pytest.mark.parametrize("form", ["readings", "readings_tq"])
def test_reading_vectors_in_micropython(mp_source, form):
    """Firmware rebuilds each wire-v1 vector byte for byte, plain and with the time-quality
    line: plaintext, ciphertext, signed bytes, signature, hash, payload."""
    got = mp_source.run_json(MP_SCRIPTS / "mp_reading_vectors.py", VECTORS / "readings_v1.json", form)
    assert got["kid"] == READINGS["paillier"]["kid"]
    assert got["public"] == READINGS["meter_key"]["public"]
    for g, v in zip(got[form], READINGS[form], strict=True):
        assert (g["m"], g["c"], g["signed_bytes"], g["hash"]) == (v["m"], v["c"], v["signed_bytes"], v["hash"])
        assert g["hash_check"] == v["hash"]
        assert g["payload"] == v["payload"]


@pytest.mark.parametrize("form", ["readings", "readings_tq"])
def test_reading_vectors_in_cpython(form):
    """CPython rebuilds each wire-v1 vector (plain, and with tq) and parses its payload back
    to the same reading; its canonical JSON is the payload's."""
    key = MeterKey("vec-meter_1", bytes.fromhex(READINGS["meter_key"]["seed"]))
    assert key.public_hex == READINGS["meter_key"]["public"]
    assert kid_of(N) == READINGS["paillier"]["kid"]
    for v in READINGS[form]:
        m = pack_slots({int(k): x for k, x in v["slots"].items()})
        assert format(m, "x") == v["m"]
        c = encrypt_raw(N, m, int(v["r"], 16))
        rd = make_reading(meter=v["meter"], seq=v["seq"], t=v["t"], dt=v["dt"], prev=v["prev"], kid=v["kid"],
                          c=c, sign=key.sign, tq=v.get("tq"))
        assert (rd.c, rd.signed_bytes.decode(), rd.sig, rd.hash) == (v["c"], v["signed_bytes"], v["sig"], v["hash"])
        assert parse_reading(json.dumps(v["payload"]).encode()) == rd
        assert rd.to_json() == json.dumps(v["payload"], separators=(",", ":")).encode()
        assert PRIV.raw_decrypt(int(v["c"], 16)) == m


def test_time_quality_is_one_signed_line_after_the_v1_bytes():
    """Each tq vector's signed bytes are the v1 signed bytes of the same fields plus one line
    "tq=<value>", so a plain reading and a tq reading never share signed bytes (8 lines vs 9)."""
    for v in READINGS["readings_tq"]:
        v1 = "\n".join(["gl-reading-v1", v["meter"], str(v["seq"]), str(v["t"]), str(v["dt"]), v["prev"], v["kid"],
                        v["c"]])
        assert v["signed_bytes"] == v1 + "\ntq=" + v["tq"]
    assert {v["tq"] for v in READINGS["readings_tq"]} == {"ntp", "rtc", "host", "unsynced"}


@pytest.mark.parametrize("form", ["readings", "readings_tq"])
def test_vectors_chain_by_prev_hash(form):
    """Each vector's prev is the hash of the one before; the first is 64 zeros."""
    prev = "0" * 64
    for v in READINGS[form]:
        assert v["prev"] == prev
        prev = v["hash"]


def make_firmware_readings(mp, tmp, seed: bytes, slots: list[dict], heap: str) -> list:
    job = tmp / "job.json"
    job.write_text(json.dumps({"seed": seed.hex(), "n": str(N), "slots": slots}))
    return [parse_reading(p.encode()) for p in mp.run_json(MP_SCRIPTS / "mp_make_readings.py", job, heap=heap)]


@pytest.fixture(scope="module")
def firmware_readings(mp_source, tmp_path_factory):
    slots = [{"0": 812, "1": 0}, {"4": 1500, "5": 37}, {"0": 812, "1": 0}, {"14": 281474976710655}]
    seed = bytes(range(32))
    readings = make_firmware_readings(mp_source, tmp_path_factory.mktemp("fw"), seed, slots, "128k")
    return seed, slots, readings


def test_firmware_signatures_verify_with_cryptography(firmware_readings):
    """Readings signed on MicroPython verify with `cryptography` under the meter's public key."""
    seed, _, readings = firmware_readings
    pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(MeterKey("x", seed).public_hex))
    for r in readings:
        pub.verify(bytes.fromhex(r.sig), r.signed_bytes)


@pytest.mark.parametrize("where", ["signed_bytes", "signature"])
def test_a_flipped_byte_fails_verification(firmware_readings, where):
    """Flipping any single byte of the signed bytes or the signature makes verification fail."""
    seed, _, readings = firmware_readings
    pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(MeterKey("x", seed).public_hex))
    r = readings[1]
    msg, sig = bytearray(r.signed_bytes), bytearray.fromhex(r.sig)
    target = msg if where == "signed_bytes" else sig
    for pos in (0, len(target) // 2, len(target) - 1):
        target[pos] ^= 0x01
        with pytest.raises(InvalidSignature):
            pub.verify(bytes(sig), bytes(msg))
        target[pos] ^= 0x01
    pub.verify(bytes(sig), bytes(msg))


def test_firmware_ciphertexts_decrypt_to_the_packed_slots(firmware_readings):
    """phe decrypts each firmware ciphertext to the packed plaintext; unpacking gives the inputs."""
    _, slots, readings = firmware_readings
    for r, s in zip(readings, slots, strict=True):
        m = PRIV.raw_decrypt(r.ciphertext)
        want = {int(k): v for k, v in s.items()}
        assert m == pack_slots(want)
        assert unpack_slots(m) == [want.get(i, 0) for i in range(16)]


def test_firmware_randomness_hides_equal_readings(firmware_readings):
    """Equal plaintexts (readings 0 and 2) get different ciphertexts: the DJN pool never repeats."""
    _, slots, readings = firmware_readings
    assert slots[0] == slots[2]
    assert readings[0].c != readings[2].c


def test_firmware_readings_chain(firmware_readings):
    """Each firmware reading's prev is the previous reading's hash, and seq counts from 1."""
    _, _, readings = firmware_readings
    prev = "0" * 64
    for i, r in enumerate(readings, 1):
        assert (r.seq, r.prev) == (i, prev)
        prev = r.hash


def test_reading_fits_a_small_heap(mp_source, tmp_path):
    """A full reading (DJN pool, encrypt, sign, JSON) runs in a 64 KiB MicroPython heap."""
    (r,) = make_firmware_readings(mp_source, tmp_path, bytes(32), [{"0": 5}], "64k")
    assert PRIV.raw_decrypt(r.ciphertext) == 5


@pytest.mark.parametrize("src", sorted(FIRMWARE_SRC.glob("*.py")), ids=lambda p: p.name)
def test_every_firmware_file_compiles_with_mpy_cross(src, tmp_path):
    """mpy-cross compiles each firmware module (what is flashed to boards)."""
    out = tmp_path / (src.stem + ".mpy")
    res = subprocess.run([mpy_cross(), "-o", str(out), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:1] == b"M"  # .mpy magic


def test_bundle_holds_every_module(firmware_bundle):
    """The flashed bundle has every firmware module and umqtt.simple, compiled."""
    names = {p.relative_to(firmware_bundle).as_posix() for p in firmware_bundle.rglob("*") if p.is_file()}
    want = {f"{p.stem}.mpy" for p in FIRMWARE_SRC.glob("*.py") if p.name != "main.py"} | {"main.py", "umqtt/simple.mpy"}
    assert want <= names
