"""The load generator speaks exactly the firmware's wire v1 (shared vectors, the
firmware's randomness pool run under the real micropython binary), and drives a
real gateway through real Mosquitto until every reading is acknowledged."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import signal
import time
from pathlib import Path

import pytest

from aggregator.registry import load_registry
from aggregator.store import GatewayStore
from gridledger import eventloop
from gridledger.broker import free_port
from gridledger.cli import main
from gridledger.loadgen import (LoadArea, LoadError, LoadMeter, Outgoing, RhoPool, _Flight, default_exp_bits, encrypt_with,
                                generate_area, precompute, run_load)
from gridledger.meterkeys import MeterKey
from gridledger.paillier import PublicKey, add_ciphertexts, djn_rho
from gridledger.testbed import gateway_process
from gridledger.wire import SLOTS, ZERO_HASH, pack_slots, parse_reading, unpack_slots

from conftest import MP_SCRIPTS, VECTORS
from helpers import N, PRIV, log_events

READINGS = json.loads((VECTORS / "readings_v1.json").read_text())
PUB = PublicKey(N)
T0 = 1795160700
NBYTES = (N.bit_length() + 7) // 8


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# -- shared vectors: byte for byte what the firmware produces --------------------

@pytest.mark.parametrize("form", ["readings", "readings_tq"])
def test_loadmeter_rebuilds_every_wire_v1_vector(form):
    """Given each vector's key, slots, r^n, t, dt (and time quality), LoadMeter chains to its
    seq and prev and produces its ciphertext, signed bytes, signature, hash and payload bytes exactly."""
    meter = LoadMeter(MeterKey("vec-meter_1", bytes.fromhex(READINGS["meter_key"]["seed"])), PUB)
    assert meter.kid == READINGS["paillier"]["kid"]
    for v in READINGS[form]:
        meter.tq = v.get("tq")
        m = pack_slots({int(k): x for k, x in v["slots"].items()})
        rd = meter.reading(m, pow(int(v["r"], 16), N, N * N), t=v["t"], dt=v["dt"])
        assert (rd.meter, rd.seq, rd.prev, rd.kid) == (v["meter"], v["seq"], v["prev"], v["kid"])
        assert (rd.c, rd.signed_bytes.decode(), rd.sig, rd.hash) == (v["c"], v["signed_bytes"], v["sig"], v["hash"])
        assert rd.to_json() == json.dumps(v["payload"], separators=(",", ":")).encode()
        assert (meter.seq, meter.prev, meter.t) == (v["seq"], v["hash"], v["t"])


def stream(label: str, size: int, zeros: int = 0) -> bytes:
    out = bytes(zeros)
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"{label}/{i}".encode()).digest()
        i += 1
    return out[:size]


# The first case opens with zero bytes: an all-zero seed is as good as any other.
POOL_CASES = [
    {"stream": stream("pool-a", 3 * NBYTES + 3 * 128, zeros=NBYTES), "exp_bits": None,
     "m": [0, pack_slots({0: 812, 1: 3}), N - 1]},
    {"stream": stream("pool-b", 2 * NBYTES), "exp_bits": 200, "m": [5, 5]},
]


@pytest.fixture(scope="module")
def firmware_pool(mp_source, tmp_path_factory):
    job = tmp_path_factory.mktemp("pool") / "job.json"
    job.write_text(json.dumps({"n": str(N), "cases": [
        {"stream": c["stream"].hex(), "exp_bits": c["exp_bits"], "m": [format(m, "x") for m in c["m"]]}
        for c in POOL_CASES]}))
    return mp_source.run_json(MP_SCRIPTS / "mp_rho_pool.py", job, heap="256k")


def cpython_draws(case: dict) -> tuple[RhoPool, list[int], int]:
    src = io.BytesIO(case["stream"])
    pool = RhoPool(N, len(case["m"]), case["exp_bits"], randbytes=src.read)
    while not pool.full():
        pool.refill_one()
    return pool, [pool.take() for _ in case["m"]], src.tell()


def test_rho_pool_matches_the_firmware_pool_draw_for_draw(firmware_pool):
    """Fed the same bytes, RhoPool and firmware/paillier.py under micropython derive the same h
    (from n) and exponents (from seeds): equal exponent size, rho values, ciphertexts and bytes
    consumed."""
    for case, fw in zip(POOL_CASES, firmware_pool, strict=True):
        pool, rhos, used = cpython_draws(case)
        assert pool.exp_bits == fw["exp_bits"] == (case["exp_bits"] or default_exp_bits(N.bit_length()))
        assert [format(r, "x") for r in rhos] == fw["rho"]
        assert [format(encrypt_with(N, m, r), "x") for m, r in zip(case["m"], rhos)] == fw["c"]
        assert used == fw["used"]
        assert fw["stepped"] == fw["rho"]  # step() by step() gives the same values
        # the work really is cut up: the boot in windows of 48 exponent bits, each refill in ~10 steps
        assert fw["boot_steps"] >= N.bit_length() // 48
        assert fw["refill_steps"] >= len(case["m"]) * (pool.exp_bits // 48)
        # a resend computed again with a refill under way, steps interleaved: both values exact
        mixed = fw["mixed"]
        assert mixed["under_way"] and mixed["turns"] >= 2, mixed
        rho0 = djn_rho(N, bytes.fromhex(mixed["resend_seed"]), pool.exp_bits)
        assert int(mixed["resend_c"], 16) == encrypt_with(N, case["m"][0], rho0)
        assert int(mixed["refill_rho"], 16) == djn_rho(N, bytes.fromhex(mixed["refill_seed"]), pool.exp_bits)
    # h is a hash of n, not drawn: the stream gives each value's 16-byte seed, nothing else
    assert [fw["used"] for fw in firmware_pool] == [3 * 16, 2 * 16]
    assert len(set(firmware_pool[1]["c"])) == 2  # equal plaintexts, different ciphertexts


def test_default_exponent_length_is_the_same_rule_in_firmware_and_loadgen(mp_source, tmp_path):
    """Both pools pick 4x the modulus's security level (NIST SP 800-57) as the DJN exponent length."""
    sizes = [1024, 2048, 2049, 3072, 4096, 7680, 8192]
    script = "import paillier, json; print(json.dumps([paillier.default_exp_bits(b) for b in %r]))" % sizes
    (tmp_path / "rule.py").write_text(script)
    got = mp_source.run_json(tmp_path / "rule.py")
    assert got == [default_exp_bits(b) for b in sizes] == [448, 448, 512, 512, 768, 768, 1024]


def test_pool_values_are_encryptions_of_zero():
    """Each rho is an n-th residue (decrypts to 0), so ciphertexts are ordinary Paillier;
    a unit not raised to the n-th power is not."""
    _, rhos, _ = cpython_draws(POOL_CASES[1])
    assert [PRIV.raw_decrypt(r) for r in rhos] == [0, 0]
    assert PRIV.raw_decrypt(int.from_bytes(stream("unit", NBYTES), "big") % N) != 0


def test_loadgen_ciphertexts_decrypt_to_the_meters_truth():
    """The private key decrypts every LoadMeter ciphertext to the packed slots of its (seed, seq);
    a tampered ciphertext does not."""
    meter = LoadMeter(MeterKey("m1", bytes(32)), PUB, seed=7, t=T0)
    readings = [meter.next(RhoPool(N)) for _ in range(4)]
    for r in readings:
        assert PRIV.raw_decrypt(r.ciphertext) == pack_slots(meter.slots(r.seq))
    assert PRIV.raw_decrypt(readings[0].ciphertext * (1 + N) % (N * N)) == pack_slots(meter.slots(1)) + 1
    assert [r.t for r in readings] == [T0 + 900 * i for i in range(1, 5)]
    assert LoadMeter(meter.key, PUB, seed=7).slots(3) == meter.slots(3) != LoadMeter(meter.key, PUB, seed=8).slots(3)


@pytest.mark.parametrize("m", [-1, N, N + 1])
def test_encrypt_refuses_plaintexts_outside_zn(m):
    with pytest.raises(ValueError):
        encrypt_with(N, m, 1)


def test_precompute_interleaves_meters_and_keeps_each_chain_in_order():
    """Payloads go round-robin over meters; per meter they are seq 1..k, each chaining to the last."""
    meters = [LoadMeter(MeterKey(f"m{i}", bytes([i]) * 32), PUB, seed=i, t=T0) for i in range(1, 4)]
    out = precompute(meters, 2, RhoPool(N))
    assert [(o.meter, o.seq) for o in out] == [(m, s) for s in (1, 2) for m in ("m1", "m2", "m3")]
    prev: dict[str, str] = {}
    for o in out:
        r = parse_reading(o.body)
        assert (r.meter, r.seq, r.t, r.hash) == (o.meter, o.seq, o.t, o.hash)
        assert r.prev == prev.get(r.meter, ZERO_HASH)
        prev[r.meter] = r.hash


def test_flight_acks_release_through_s_and_resend_only_the_overdue():
    """An ack of S releases every reading of that meter up to S; only readings out longer than the
    resend time are due again, oldest first."""
    payloads = [Outgoing(m, s, 0, "", b"") for s in (1, 2, 3) for m in ("a", "b")]
    f = _Flight(payloads)
    for i, o in enumerate(payloads):
        f.published(o, now=float(i))
    f.ack("a", 2, now=6.0)
    f.ack("a", 1, now=6.5)  # a stale ack changes nothing
    f.ack("z", 9, now=6.5)  # nor an ack for a meter outside the run
    assert (f.unacked, f.acked, f.last_ack) == (4, {"a": 2}, 6.0)
    assert [(o.meter, o.seq) for o in f.due(now=8.0, resend_s=5.0)] == [("b", 1), ("b", 2)]
    assert f.due(now=8.0, resend_s=5.0) == []
    f.ack("a", 3, now=9.0)
    f.ack("b", 3, now=9.0)
    assert f.done and f.unacked == 0 and f.result().complete and f.result().resent == 2


# -- end to end: real Mosquitto, a real gateway process ---------------------------

class GatewayRun:
    def __init__(self, tmp: Path, broker):
        self.tmp, self.broker, self.proc = tmp, broker, None
        self.db = tmp / "gateway.db"
        self.log = tmp / "gateway.log"

    def config(self, area: str, registry: Path, paillier_public: Path) -> Path:
        cfg = self.tmp / "gateway.toml"
        cfg.write_text(f'[gateway]\narea = "{area}"\ndatabase = "gateway.db"\nregistry = "{registry}"\n'
                       f'paillier_public = "{paillier_public}"\n\n'
                       f'[mqtt]\nhost = "{self.broker.host}"\nport = {self.broker.port}\n')
        return cfg

    def start(self, cfg: Path) -> None:
        self.proc = gateway_process(cfg, self.log)
        wait_until(lambda: self.log.exists() and '"mqtt_up"' in self.log.read_text() or self.proc.poll() is not None,
                   20, "the gateway to subscribe")
        assert self.proc.poll() is None, self.log.read_text()[-2000:]

    def start_area(self, area: LoadArea) -> None:
        self.start(self.config(area.area, area.registry, area.directory / "paillier.pub.json"))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0, self.log.read_text()[-2000:]

    def store(self) -> GatewayStore:
        return GatewayStore(self.db)


@pytest.fixture
def gateway(tmp_path, broker):
    run = GatewayRun(tmp_path, broker)
    yield run
    if run.proc is not None and run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


def assert_stored_chains(store: GatewayStore, payloads: list[Outgoing], per_meter: int) -> list:
    """Each meter holds seq 1..per_meter exactly once, chained, with the hashes the loadgen sent."""
    sent = {(o.meter, o.seq): o.hash for o in payloads}
    rows = store.readings()
    assert len(rows) == len(sent)
    for meter in {o.meter for o in payloads}:
        rs = [r for r in rows if r.meter == meter]
        assert [r.seq for r in rs] == list(range(1, per_meter + 1)), meter
        prev = ZERO_HASH
        for r in rs:
            assert (r.prev, r.hash) == (prev, sent[(meter, r.seq)])
            prev = r.hash
    return rows


@pytest.mark.parametrize("transport, loop", [("aiomqtt", "uvloop"), ("link", "uvloop"), ("link", "asyncio")])
def test_every_reading_is_acked_and_stored_once(tmp_path, broker, gateway, transport, loop, monkeypatch):
    """20 meters x 10 readings: all acked with at most `window` in flight, stored exactly once per
    seq in chain order, and the area's product of ciphertexts decrypts to the meters' truth; over
    QoS 1 as meters publish, and over the benches' lean QoS 0 link; the gateway and the load
    generator on uvloop, as they run by default, and on the standard library's loop."""
    if loop == "asyncio":
        monkeypatch.setenv(eventloop.ENV, "asyncio")  # inherited by the gateway's process
    area = generate_area(tmp_path / "lg", 20, area="area1", paillier_public=PUB)
    gateway.start_area(area)
    meters = area.meters(start_t=T0)
    payloads = precompute(meters, 10, RhoPool(N))

    async def load():
        assert eventloop.running() == loop
        return await run_load(broker.host, broker.port, "area1", payloads, window=64, timeout=30,
                              transport=transport)

    res = eventloop.run(load())
    assert [e["loop"] for e in log_events(gateway.log) if e["ev"] == "event_loop"] == [loop]
    assert res.complete and (res.sent, res.acked_readings, res.nacks) == (200, 200, {})
    assert res.acked == {m.meter: 10 for m in meters}
    assert 0 < res.peak_unacked <= 64
    assert res.readings_per_s > 0 and res.last_ack > res.first_publish
    gateway.stop()
    store = gateway.store()
    try:
        rows = assert_stored_chains(store, payloads, 10)
        assert store.db.execute("SELECT COUNT(*) FROM evidence").fetchone()[0] == 0
    finally:
        store.close()
    truth = [sum(m.slots(s).get(i, 0) for m in meters for s in range(1, 11)) for i in range(SLOTS)]
    assert unpack_slots(PRIV.raw_decrypt(add_ciphertexts(N, [r.ciphertext for r in rows]))) == truth


def test_readings_published_before_the_gateway_listens_are_resent(tmp_path, broker, gateway):
    """With no subscriber the broker drops the first publishes; the loadgen resends each one after
    its resend time, and the late gateway stores every reading once."""
    area = generate_area(tmp_path / "lg", 4, area="area1", paillier_public=PUB)
    payloads = precompute(area.meters(start_t=T0), 3, RhoPool(N))

    async def go():
        run = asyncio.create_task(run_load(broker.host, broker.port, "area1", payloads, resend_s=1.0, timeout=25))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(gateway.start_area, area)
        return await run

    res = asyncio.run(go())
    assert res.complete and res.sent == 12 and res.resent >= 12
    gateway.stop()
    store = gateway.store()
    try:
        assert_stored_chains(store, payloads, 3)
    finally:
        store.close()


def test_refused_readings_are_counted_by_reason_and_never_acked(tmp_path, broker, gateway):
    """A meter signing with a key its registry entry does not hold is nacked bad_signature: the run
    ends at its time-out incomplete, and only the honest meter is acked and stored."""
    area = generate_area(tmp_path / "lg", 2, area="area1", paillier_public=PUB)
    gateway.start_area(area)
    good, bad = area.meters(start_t=T0)
    bad.key = MeterKey(bad.meter, bytes(32))
    payloads = precompute([good, bad], 2, RhoPool(N))
    res = asyncio.run(run_load(broker.host, broker.port, "area1", payloads, resend_s=1.0, timeout=4))
    assert not res.complete and res.acked_readings == 2
    assert res.acked == {good.meter: 2}
    assert set(res.nacks) == {"bad_signature"} and res.nacks["bad_signature"] >= 2
    gateway.stop()
    store = gateway.store()
    try:
        assert [(r.meter, r.seq) for r in store.readings()] == [(good.meter, 1), (good.meter, 2)]
        assert store.rejection_counts()["bad_signature"] >= 2
    finally:
        store.close()


def test_an_unreachable_broker_is_a_load_error():
    """Connecting to a port nobody listens on raises LoadError (a GridledgerError), not an MQTT internal."""
    with pytest.raises(LoadError, match="MQTT broker"):
        asyncio.run(run_load("127.0.0.1", free_port(), "area1", [Outgoing("m1", 1, 0, "", b"{}")], timeout=5))


# -- the CLI -----------------------------------------------------------------------

def write_pub(path: Path) -> Path:
    path.write_text(json.dumps({"n": str(N), "kid": PUB.kid}))
    return path


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_generate_only_writes_a_registry_the_gateway_loads(tmp_path, capsys):
    """--generate-only writes N meter keys and a registry that load_registry accepts, with matching
    public keys and acct-METER accounts; a second run into the same folder is refused."""
    lg = tmp_path / "lg"
    args = ["loadgen", "run", "--keys", str(lg), "--meters", "5", "--area", "area1",
            "--paillier-public", str(write_pub(tmp_path / "pub.json")), "--generate-only"]
    assert main(args) == 0
    assert last_json(capsys)["meters"] == 5
    reg = load_registry(lg / "registry.toml")
    assert len(reg) == 5
    for e in reg:
        assert e.account == f"acct-{e.meter}"
        assert MeterKey.read_seed(e.meter, lg / "meters" / f"{e.meter}.ed25519.key").public_hex == e.public_key
    assert main(args) == 2
    assert "already holds a load area" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--meters", "0", "--area", "a1"], "--meters must be at least 1"),
    (["--window", "0", "--area", "a1"], "--window must be at least 1"),
    (["--port", "70000", "--area", "a1"], "--port must be 1..65535"),
    (["--area", "bad area!"], "area id"),
    ([], "holds no load area"),
])
def test_cli_refuses_bad_input_with_a_config_error(tmp_path, capsys, extra, message):
    pub = write_pub(tmp_path / "pub.json")
    args = ["loadgen", "run", "--keys", str(tmp_path / "lg"), "--generate-only", *extra]
    if "--area" in extra:
        args += ["--paillier-public", str(pub)]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_runs_from_a_gateway_config_and_extends_chains_across_runs(tmp_path, capsys, gateway):
    """`loadgen run --config` generates, then runs twice against the gateway of that config: every
    reading acked, the second run continuing each chain at seq 3 with no refusals."""
    cfg = gateway.config("area1", tmp_path / "lg" / "registry.toml", write_pub(tmp_path / "pub.json"))
    base = ["loadgen", "run", "--config", str(cfg), "--keys", str(tmp_path / "lg"), "--meters", "3"]
    assert main([*base, "--generate-only"]) == 0
    capsys.readouterr()
    gateway.start(cfg)
    for _ in range(2):
        assert main([*base, "--readings", "2", "--timeout", "20"]) == 0
        summary = last_json(capsys)
        timing = {"readings_per_s", "seconds", "peak_unacked", "resent"}  # vary with the machine's load
        assert {k: v for k, v in summary.items() if k not in timing} == {
            "meters": 3, "area": "area1", "readings": 6, "sent": 6, "acked": 6, "nacks": {}, "complete": True}
        assert timing <= set(summary) and summary["readings_per_s"] > 0
    gateway.stop()
    store = gateway.store()
    try:
        assert sorted({(r.meter, r.seq) for r in store.readings()}) == [
            (f"lg{i:05d}", s) for i in (1, 2, 3) for s in (1, 2, 3, 4)]
        assert store.rejection_counts() == {}
    finally:
        store.close()
