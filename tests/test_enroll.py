"""Enrollment rules of the registry chain, and enrolling a key that never leaves the
device: the meter (the firmware's Ed25519 under the real MicroPython binary) signs
the bytes `registry enroll-request` prints, and the registry checks that proof."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from certlog.block import ChainError
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.voter import Voter
from conftest import MP_SCRIPTS, MicroPython
from coordinator.registry import submit
from coordinator.registryapp import (REASONS, Genesis, RegistryApp, RegistryHistory, enroll_record,
                                     enrollment_message, meter_signature_ok, node_record, retire_record, sign_record)
from gridledger.config import MqttConfig
from gridledger.firmware_build import FIRMWARE_SRC
from gridledger.meterkeys import MeterKey
from gridledger.testbed import (chain_height, registry_process, validator_process, wait_up, write_chain,
                                write_registry_chain)
from gridledger.wire import kid_of

from chainkit import certify, validator_keys, validator_set
from helpers import N, wait_until

NOW = 1_790_000_000
AREA = "area1"
OPS, TECH, GW = MeterKey("ops", b"\x51" * 32), MeterKey("tech", b"\x52" * 32), MeterKey("gw", b"\x53" * 32)


def meter(i: int) -> MeterKey:
    return MeterKey(f"m{i}", bytes([0x60 + i]) * 32)


def enroll(i: int, account: str, *, area: str = AREA, replaces: str | None = None, signer: MeterKey = TECH,
           key: MeterKey | None = None) -> bytes:
    k = key or meter(i)
    rec = enroll_record(meter=f"m{i}", account=account, area=area, public_key=k.public_hex, signer=signer.meter,
                        time=NOW, replaces=replaces)
    return sign_record(rec, signer.private, k.private)


def retire(i: int) -> bytes:
    return sign_record(retire_record(target="meter", ident=f"m{i}", reason="broken", signer="tech", time=NOW),
                       TECH.private)


def node(key: MeterKey, role: str) -> bytes:
    return sign_record(node_record(ident=key.meter, role=role, public_key=key.public_hex, signer="ops", time=NOW),
                       OPS.private)


class Registry:
    """The registry chain in process: a proposer and four voters over real SQLite,
    a `RegistryHistory` following the proposer's commits."""

    def __init__(self, tmp: Path):
        sks = validator_keys()
        vset = validator_set(sks)
        genesis = Genesis({"ops": OPS.public_hex})
        reps = [Replica("registry", RegistryApp(genesis), ChainStore(connect(tmp / f"r{i}.db")), vset)
                for i in range(5)]
        self.prop, self.voters = reps[0], [Voter(r, i, sk) for i, (r, sk) in enumerate(zip(reps[1:], sks))]
        self.history = RegistryHistory()
        self.prop.listeners.append(self.history.apply)
        self.certify([node(TECH, "technician"), node(GW, "gateway")])

    def certify(self, txs: list[bytes]):
        return certify(self.prop, self.voters, txs)

    def refusal(self, txs: list[bytes]) -> str:
        """The reason a voter's app refuses a block of `txs` (nothing is committed)."""
        r = self.voters[0].replica
        with pytest.raises(ChainError) as info:
            r.app.execute(r.store.nodes, r.state_root, NOW * 1000, txs)
        return info.value.reason

    def meter_leaf(self, ident: str) -> list:
        from coordinator.registryapp import _State
        from certlog.mpt import Trie
        return _State(Trie(self.prop.store.nodes, bytes.fromhex(self.prop.state_root))).get("meter", ident)


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path)


# -- the rules ------------------------------------------------------------------------------

def test_a_swap_retires_the_old_meter_in_the_same_record_and_keeps_the_account(reg):
    reg.certify([enroll(0, "house-7")])
    header, _ = reg.certify([enroll(1, "house-7", replaces="m0")])
    assert header.app["enroll"] == 1 and header.app["retire"] == 0
    view = reg.history.view(AREA)
    assert view.get("m0") is None and view.get("m1").account == "house-7"
    assert reg.history.view(AREA, header.height - 1).get("m0") is not None  # a member until the swap
    old, new = reg.meter_leaf("m0"), reg.meter_leaf("m1")
    assert old[7] == b"\x01" and new[8] == b"m0" and new[7] == b""
    assert reg.history.account_of("m0") == reg.history.account_of("m1") == "house-7"
    # A third meter continues the same line.
    reg.certify([enroll(2, "house-7", replaces="m1")])
    assert reg.meter_leaf("m2")[8] == b"m1" and set(reg.history.active_meters()) == {"m2"}


def test_retiring_first_then_enrolling_records_the_replacement_too(reg):
    reg.certify([enroll(0, "house-7")])
    reg.certify([retire(0)])
    reg.certify([enroll(1, "house-7")])       # the account has no active meter: no need to name it
    assert reg.meter_leaf("m1")[8] == b"m0"
    reg.certify([retire(1), enroll(2, "house-7", replaces="m1")])  # naming a retired current meter is fine
    assert reg.meter_leaf("m2")[8] == b"m1"


@pytest.mark.parametrize("case, reason", [
    ("second_active_meter", "tx_account_has_meter"),
    ("replaces_another_accounts_meter", "tx_bad_replacement"),
    ("replaces_an_older_meter", "tx_bad_replacement"),
    ("replaces_unknown", "tx_bad_replacement"),
    ("replaces_across_areas", "tx_bad_replacement"),
    ("replaces_on_a_new_account", "tx_bad_replacement"),
    ("duplicate_id", "tx_duplicate_meter"),
    ("duplicate_key", "tx_duplicate_key"),
    ("node_key_as_meter_key", "tx_duplicate_key"),
    ("unregistered_technician", "tx_unknown_signer"),
    ("gateway_as_technician", "tx_signer_role"),
    ("forged_technician", "tx_bad_signature"),
    ("retired_technician", "tx_signer_retired"),
    ("bad_replaces_id", "tx_bad_field"),
])
def test_an_enrollment_that_breaks_a_rule_is_refused_with_its_reason(reg, case, reason):
    reg.certify([enroll(0, "house-7"), enroll(5, "house-9")])
    reg.certify([enroll(1, "house-7", replaces="m0")])
    stranger = MeterKey("tech2", b"\x54" * 32)
    txs = {
        "second_active_meter": [enroll(2, "house-7")],
        "replaces_another_accounts_meter": [enroll(2, "house-7", replaces="m5")],
        "replaces_an_older_meter": [enroll(2, "house-7", replaces="m0")],
        "replaces_unknown": [enroll(2, "house-7", replaces="m9")],
        "replaces_across_areas": [enroll(2, "house-7", area="area2", replaces="m1")],
        "replaces_on_a_new_account": [enroll(2, "house-8", replaces="m1")],
        "duplicate_id": [enroll(1, "house-8")],
        "duplicate_key": [enroll(2, "house-8", key=meter(0))],
        "node_key_as_meter_key": [enroll(2, "house-8", key=MeterKey("m2", TECH.seed))],
        "unregistered_technician": [enroll(2, "house-8", signer=stranger)],
        "gateway_as_technician": [enroll(2, "house-8", signer=GW)],
        "forged_technician": [enroll(2, "house-8", signer=MeterKey("tech", stranger.seed))],
        "retired_technician": [sign_record(retire_record(target="node", ident="tech", reason="left", signer="ops",
                                                         time=NOW), OPS.private), enroll(2, "house-8")],
        "bad_replaces_id": [enroll(2, "house-7", replaces="m 1")],
    }[case]
    assert reg.refusal(txs) == reason
    assert reason in REASONS  # the CLI has words for it


def test_a_device_made_proof_of_possession_is_checked(reg, tmp_path):
    """The key is generated under MicroPython by the firmware's own Ed25519 and never
    read by the host: the device signs `enrollment_message`, the registry verifies it."""
    device = MicroPython([FIRMWARE_SRC])
    (tmp_path / "dev").mkdir()
    pub = device.run(MP_SCRIPTS / "mp_device_key.py", "keygen", tmp_path / "dev").strip()
    rec = enroll_record(meter="m3", account="house-3", area=AREA, public_key=pub, signer="tech", time=NOW,
                        board="esp32", firmware="gl-1.0")
    (tmp_path / "msg").write_bytes(enrollment_message(rec))
    sig = device.run(MP_SCRIPTS / "mp_device_key.py", "sign", tmp_path / "dev", tmp_path / "msg").strip()
    assert meter_signature_ok(rec, sig)
    # Any field changed after the device signed, another key's signature, or garbage: refused.
    other = meter(7).private.sign(enrollment_message(rec)).hex()
    for bad_rec, bad_sig in [(dict(rec, account="house-4"), sig), (dict(rec, firmware="gl-0.9"), sig),
                             (rec, other), (rec, "00" * 64), (rec, "zz")]:
        assert not meter_signature_ok(bad_rec, bad_sig)
        assert reg.refusal([sign_record(bad_rec, TECH.private, meter_sig=bad_sig)]) == "tx_bad_meter_signature"
    reg.certify([sign_record(rec, TECH.private, meter_sig=sig)])
    assert reg.history.view(AREA).get("m3").public_key == pub


# -- the CLI on real parts ------------------------------------------------------------------------

class Field:
    """Mosquitto, the registry role and one validator as real processes; a technician
    with the CLI; devices as MicroPython processes that keep their keys."""

    def __init__(self, tmp: Path, broker):
        self.tmp, self.broker = tmp, broker
        (tmp / "paillier.pub.json").write_text(json.dumps({"n": str(N), "kid": kid_of(N)}))
        self.vcfgs = write_chain(tmp, area=AREA, host=broker.host, port=broker.port, validators=1,
                                 paillier_public="paillier.pub.json", registry_chain=True)
        self.setup = write_registry_chain(tmp, host=broker.host, port=broker.port)
        self.procs = []
        for name, start, cfg in (("registry", registry_process, self.setup.config),
                                 ("v0", validator_process, self.vcfgs[0])):
            log = tmp / f"{name}.log"
            self.procs.append(start(cfg, log))
            wait_up(log, self.procs[-1], timeout=60)
        self.device = MicroPython([FIRMWARE_SRC])

    def gl(self, *args: str) -> tuple[int, dict, str]:
        res = subprocess.run([sys.executable, "-m", "gridledger", *args], capture_output=True, text=True,
                             timeout=120)
        out = json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {}
        return res.returncode, out, res.stderr

    def submit_args(self, signer: str = "tech1") -> list[str]:
        return ["--signer", signer, "--key", str(self.tmp / "keys" / f"{signer}.ed25519.key"),
                "--broker", f"{self.broker.host}:{self.broker.port}"]

    def new_device(self, name: str) -> Path:
        folder = self.tmp / "devices" / name
        folder.mkdir(parents=True)
        pub = self.device.run(MP_SCRIPTS / "mp_device_key.py", "keygen", folder).strip()
        (folder / "public").write_text(pub)
        return folder

    def enroll(self, meter_id: str, account: str, device: Path, *extra: str, sign=None) -> tuple[int, dict, str]:
        """enroll-request, the device signs the file, enroll with its signature."""
        pub = (device / "public").read_text()
        fields = ["--meter", meter_id, "--account", account, "--area", AREA, "--board", "esp32",
                  "--firmware", "gl-1.0", *extra]
        rc, req, err = self.gl("registry", "enroll-request", *fields, "--public-key", pub, "--signer", "tech1",
                               "--out", str(device / "enroll.bin"))
        assert rc == 0 and bytes.fromhex(req["message"]) == (device / "enroll.bin").read_bytes(), err
        sig = sign(device / "enroll.bin") if sign else self.device.run(
            MP_SCRIPTS / "mp_device_key.py", "sign", device, device / "enroll.bin").strip()
        return self.gl("registry", "enroll", *fields, "--public-key", pub, "--meter-signature", sig,
                       "--time", str(req["time"]), *self.submit_args())

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_technician_enrolls_a_device_key_and_every_refusal_is_explained(tmp_path, broker):
    f = Field(tmp_path, broker)
    try:
        rc, out, err = f.gl("registry", "node", "--id", "tech1", "--role", "technician", "--public-key",
                            f.setup.technician.public_hex, *f.submit_args("ops"))
        assert rc == 0 and out["status"] == "certified", err
        d1, d2 = f.new_device("d1"), f.new_device("d2")

        rc, out, err = f.enroll("m1", "acct-1", d1)
        assert rc == 0 and out["status"] == "certified", err

        def refused(result, reason: str) -> None:
            rc, out, err = result
            assert rc == 1 and out["status"] == "refused" and out["reason"] == reason, (out, err)
            assert f"refused: {reason}" in err and REASONS[reason] in err

        refused(f.enroll("m1", "acct-2", d2), "tx_duplicate_meter")
        refused(f.enroll("m9", "acct-2", d1), "tx_duplicate_key")
        refused(f.enroll("m2", "acct-1", d2), "tx_account_has_meter")
        # A signature the device did not make over these bytes: refused before sending ...
        refused(f.enroll("m2", "acct-2", d2, sign=lambda _: MeterKey("x", b"\x01" * 32).sign(b"other").hex()),
                "tx_bad_meter_signature")
        # ... and by the registry role itself when sent anyway.
        pub = (d2 / "public").read_text()
        rec = enroll_record(meter="m2", account="acct-2", area=AREA, public_key=pub, signer="tech1", time=NOW)
        [result] = asyncio.run(submit(MqttConfig(host=broker.host, port=broker.port),
                                      [sign_record(rec, f.setup.technician.private, meter_sig="ab" * 64)],
                                      timeout_s=30))
        assert result["status"] == "refused" and result["reason"] == "tx_bad_meter_signature", result
        # A technician the registry does not know.
        MeterKey("tech2", b"\x33" * 32).write_seed(tmp_path / "keys" / "tech2.ed25519.key")
        meter(5).write_seed(tmp_path / "keys" / "m5.ed25519.key")
        rc, out, err = f.gl("registry", "enroll", "--meter", "m5", "--account", "acct-5", "--area", AREA,
                            "--meter-key", str(tmp_path / "keys" / "m5.ed25519.key"), *f.submit_args("tech2"))
        assert rc == 1 and out["reason"] == "tx_unknown_signer" and REASONS["tx_unknown_signer"] in err, (out, err)

        # The meter is swapped: d2 replaces m1 on acct-1, which retires m1.
        rc, out, err = f.enroll("m2", "acct-1", d2, "--replaces", "m1")
        assert rc == 0 and out["status"] == "certified", err
        # The validator's replica (what gateways read) lists only the new meter once it has the block.
        wait_until(lambda: chain_height(tmp_path / "validators" / "v0-registry.db") >= out["height"], 30,
                   "v0 to hold the swap")
        rc, shown, err = f.gl("registry", "show", "--config", str(f.vcfgs[0]))
        assert rc == 0 and shown["meters"] == [{"meter": "m2", "account": "acct-1", "public_key": pub}], err
    finally:
        f.cleanup()
