"""Broker security on a real Mosquitto loaded with the files `gridledger broker` writes:
accounts with `$7$` password hashes, per-account ACLs from the registry, a TLS
listener under the operator's CA, and reloads on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.client import topic_matches_sub

from aggregator.storagewire import StorageTopics
from certlog.net import Topics
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.validators import dump_validator_set
from certlog.voter import Voter
from coordinator.decrypt import REQUESTS_TOPIC, decisions_topic, response_topic
from coordinator.registryapp import (Genesis, RegistryApp, dump_genesis, enroll_record, node_record, retire_record,
                                     sign_record)
from gridledger.broker import find_mosquitto, free_port, run_mosquitto
from gridledger.brokerauth import (Account, BrokerAuthError, Members, check_password, hash_password,
                                   load_members, meter_topics, render_acl, role_topics)
from gridledger.brokertls import check_tls, make_testbed_ca
from gridledger.meterkeys import MeterKey
from gridledger.testbed import (chain_height, gateway_process, registry_process, validator_process, wait_up,
                                write_chain, write_registry_chain)
from gridledger.wire import ack_topic, kid_of, nack_topic, readings_topic

from chainkit import certify, validator_keys, validator_set
from helpers import N, SimMeter, log_events, make_area, meter_keys, wait_until

AREA = "area1"
NOW = 1_790_000_000
GRACE_S = 0.5  # after a later message arrived, how long an earlier forbidden one may still be in flight


def gl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gridledger", *args], capture_output=True, text=True, timeout=60)


def gl_json(*args: str) -> dict:
    res = gl(*args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


class SecureBroker:
    """broker/ (accounts, passwd, acl, mosquitto.conf) and certs/ made by the CLI, and
    Mosquitto running them the Debian way: a main file that includes broker/*.conf."""

    def __init__(self, tmp: Path, registry_config: Path | None = None, meters=("m1", "m2")):
        self.tmp = tmp
        self.local, self.tls = free_port(), free_port()
        self.gateway_cfg, self.keys = make_area(tmp, list(meters), host="127.0.0.1", port=self.local, area=AREA)
        self.registry_config = registry_config or self.gateway_cfg
        self.dir, self.certs = tmp / "broker", tmp / "certs"
        self.passwords = {m: self.add(m, "meter") for m in meters}
        self.passwords["gw1"] = self.add("gw1", "gateway", "--area", AREA)
        res = gl("broker", "testbed-ca", "--out", str(self.certs), "--host", "localhost", "--host", "127.0.0.1")
        assert res.returncode == 0, res.stderr
        self.regenerate_acl()
        res = gl("broker", "config", "--out", str(self.dir), "--tls-cert", str(self.certs / "server.crt"),
                 "--tls-key", str(self.certs / "server.key"), "--ca", str(self.certs / "ca.crt"),
                 "--tls-port", str(self.tls), "--tls-bind", "127.0.0.1", "--local-port", str(self.local))
        assert res.returncode == 0, res.stderr
        main = tmp / "mosquitto-main.conf"
        # Mosquitto started as root drops to user mosquitto, who cannot read a test's 0600 files.
        main.write_text(("user root\n" if os.geteuid() == 0 else "") + "persistence false\nlog_dest stderr\n"
                        f"include_dir {self.dir}\n")
        if find_mosquitto() is None:
            pytest.fail("mosquitto is not installed; `./run test` installs it from Debian's packages")
        self.broker = run_mosquitto(main, self.local, tmp / "mosquitto.log")
        with open(self.gateway_cfg, "a") as f:
            f.write(f'username = "gw1"\npassword = "{self.passwords["gw1"]}"\n')

    def add(self, ident: str, role: str, *extra: str) -> str:
        return gl_json("broker", "credentials", "add", "--id", ident, "--role", role, "--out", str(self.dir),
                       *extra)["password"]

    def regenerate_acl(self) -> dict:
        return gl_json("broker", "acl", "--registry-config", str(self.registry_config), "--out", str(self.dir / "acl"))

    def reload(self) -> None:
        self.broker.proc.send_signal(signal.SIGHUP)

    def client(self, user: str | None, password: str | None = None, *, tls: bool = True,
               ca: Path | None = None) -> aiomqtt.Client:
        """A meter-like client over TLS (trusting `ca`, default the broker's CA), or a
        local role's over the plain loopback listener."""
        if password is None and user is not None:
            password = self.passwords[user]
        params = aiomqtt.TLSParameters(ca_certs=str(ca or self.certs / "ca.crt")) if tls else None
        return aiomqtt.Client("127.0.0.1", self.tls if tls else self.local, username=user, password=password,
                              tls_params=params, timeout=5)

    def stop(self) -> None:
        self.broker.stop()


@pytest.fixture
def secure(tmp_path):
    b = SecureBroker(tmp_path)
    yield b
    b.stop()


class Inbox:
    """Everything one subscribed client receives, with bounded waits."""

    def __init__(self, client: aiomqtt.Client):
        self.client, self.got = client, []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for msg in self.client.messages:
            self.got.append((msg.topic.value, bytes(msg.payload)))
            self._new.set()

    async def wait_for(self, topic: str, timeout: float = 10.0) -> bytes:
        async with asyncio.timeout(timeout):
            while True:
                for t, p in self.got:
                    if t == topic:
                        return p
                self._new.clear()
                await self._new.wait()

    def topics(self) -> list[str]:
        return [t for t, _ in self.got]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# -- on a running broker ------------------------------------------------------------------

async def test_a_meter_publishes_only_under_its_own_topics(secure):
    """m1's reading on m2's topic never reaches the gateway; its own does."""
    async with secure.client("gw1", tls=False) as gw, secure.client("m1") as m1:
        await gw.subscribe(f"gl/v1/{AREA}/meters/#", qos=1)
        inbox = Inbox(gw)
        await m1.publish(readings_topic(AREA, "m2"), b"forged", qos=1)
        await m1.publish(ack_topic(AREA, "m1"), b'{"seq": 99}', qos=1)   # nor may it ack itself
        await m1.publish(readings_topic(AREA, "m1"), b"own", qos=1)
        assert await inbox.wait_for(readings_topic(AREA, "m1")) == b"own"
        await asyncio.sleep(GRACE_S)
        assert inbox.topics() == [readings_topic(AREA, "m1")]
        await inbox.close()


async def test_a_meter_reads_only_its_own_acks(secure):
    """m1 subscribed to m2's ack topic (and to everything) still gets only its own acks."""
    async with secure.client("gw1", tls=False) as gw, secure.client("m1") as m1:
        for t in (ack_topic(AREA, "m2"), nack_topic(AREA, "m2"), "gl/v1/#", ack_topic(AREA, "m1")):
            await m1.subscribe(t, qos=1)
        inbox = Inbox(m1)
        await gw.publish(ack_topic(AREA, "m2"), b'{"seq": 1}', qos=1)
        await gw.publish(nack_topic(AREA, "m2"), b'{"seq": 1, "reason": "x"}', qos=1)
        await gw.publish(ack_topic(AREA, "m1"), b'{"seq": 7}', qos=1)
        assert await inbox.wait_for(ack_topic(AREA, "m1")) == b'{"seq": 7}'
        await asyncio.sleep(GRACE_S)
        assert set(inbox.topics()) == {ack_topic(AREA, "m1")}
        await inbox.close()


@pytest.mark.parametrize("user, password", [
    (None, None),                 # anonymous
    ("intruder", "whatever"),     # unknown account
    ("m1", "wrong-password"),
    ("m1", "m2"),                 # another meter's password
], ids=["anonymous", "unknown", "wrong_password", "other_meters_password"])
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "loopback"])
async def test_unknown_and_wrong_credentials_are_refused(secure, user, password, tls):
    password = secure.passwords.get(password, password)
    with pytest.raises(aiomqtt.MqttError) as info:
        async with secure.client(user, password, tls=tls):
            pass
    assert "Not authorized" in str(info.value) or "135" in str(info.value), info.value


async def test_the_tls_listener_trusts_only_the_operators_ca(secure, tmp_path):
    """A client trusting the CA connects over TLS; one trusting another CA, or talking
    plain MQTT to the TLS port, does not."""
    async with secure.client("m1") as m1:
        await m1.publish(readings_topic(AREA, "m1"), b"over tls", qos=1)
    make_testbed_ca(tmp_path / "other", ["localhost"])
    with pytest.raises(aiomqtt.MqttError) as info:
        async with secure.client("m1", ca=tmp_path / "other" / "ca.crt"):
            pass
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", secure.tls, username="m1", password=secure.passwords["m1"],
                                  timeout=3):
            pass


async def test_the_gateway_ingests_a_real_reading_with_its_own_account(secure, tmp_path):
    """The gateway (loopback, its generated account) acks a signed reading that m1 sent
    over TLS with its account; m1 reads the ack on its own topic."""
    log = tmp_path / "gateway.log"
    gw = gateway_process(secure.gateway_cfg, log)
    try:
        await asyncio.to_thread(wait_up, log, gw, 30)
        sim = SimMeter(secure.keys["m1"])
        async with secure.client("m1") as m1:
            await m1.subscribe(ack_topic(AREA, "m1"), qos=1)
            inbox = Inbox(m1)
            await m1.publish(readings_topic(AREA, "m1"), sim.next().to_json(), qos=1)
            assert json.loads(await inbox.wait_for(ack_topic(AREA, "m1"), timeout=30)) == {"seq": 1}
            await inbox.close()
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(15)
    with sqlite3.connect(tmp_path / "gateway.db") as conn:
        assert conn.execute("SELECT meter, seq FROM readings").fetchall() == [("m1", 1)]


async def test_a_rotated_password_replaces_the_old_one_on_sighup(secure):
    old = secure.passwords["m1"]
    res = gl("broker", "credentials", "add", "--id", "m1", "--role", "meter", "--out", str(secure.dir))
    assert res.returncode == 2 and "account_exists" in res.stderr and "--rotate" in res.stderr
    new = gl_json("broker", "credentials", "add", "--id", "m1", "--role", "meter", "--out", str(secure.dir),
                  "--rotate")["password"]
    secure.reload()
    await asyncio.sleep(0.5)
    async with secure.client("m1", new):
        pass
    with pytest.raises(aiomqtt.MqttError):
        async with secure.client("m1", old):
            pass


async def test_the_registry_chain_runs_under_the_acl_and_a_technician_enrolls_over_tls(secure, tmp_path):
    """Real roles with their generated accounts: the registry role and a validator on
    the loopback listener, a registrar and a technician with `--mqtt` files over TLS.
    The ACL grants are what the code needs: the record is certified."""
    (tmp_path / "paillier.pub.json").write_text(json.dumps({"n": str(N), "kid": kid_of(N)}))
    [vcfg] = write_chain(tmp_path, area=AREA, host="127.0.0.1", port=secure.local, validators=1,
                         paillier_public="paillier.pub.json", registry_chain=True)
    setup = write_registry_chain(tmp_path, host="127.0.0.1", port=secure.local)
    for ident, role, cfg in (("registry", "registry", setup.config), ("v0", "validator", vcfg)):
        secure.passwords[ident] = secure.add(ident, role, *(("--area", AREA) if role == "validator" else ()))
        cfg.write_text(cfg.read_text().replace("[mqtt]\n", f'[mqtt]\nusername = "{ident}"\n'
                                                          f'password = "{secure.passwords[ident]}"\n'))
    for ident in ("ops", "tech1"):
        secure.passwords[ident] = secure.add(ident, "technician")
        (tmp_path / f"{ident}.toml").write_text(
            f'[mqtt]\nhost = "127.0.0.1"\nport = {secure.tls}\nusername = "{ident}"\n'
            f'password = "{secure.passwords[ident]}"\ntls_ca = "certs/ca.crt"\n')
    secure.regenerate_acl()
    secure.reload()
    procs = []
    try:
        for name, start, cfg in (("registry", registry_process, setup.config), ("v0", validator_process, vcfg)):
            procs.append(start(cfg, tmp_path / f"{name}.log"))
            await asyncio.to_thread(wait_up, tmp_path / f"{name}.log", procs[-1], 60)
        keys = tmp_path / "keys"
        res = await asyncio.to_thread(gl, "registry", "node", "--id", "tech1", "--role", "technician",
                                      "--public-key", setup.technician.public_hex, "--signer", "ops",
                                      "--key", str(keys / "ops.ed25519.key"), "--mqtt", str(tmp_path / "ops.toml"))
        assert res.returncode == 0 and json.loads(res.stdout)["status"] == "certified", (res.stdout, res.stderr)
        secure.keys["m1"].write_seed(keys / "m1.ed25519.key")
        res = await asyncio.to_thread(gl, "registry", "enroll", "--meter", "m1", "--account", "acct-1", "--area", AREA,
                                      "--meter-key", str(keys / "m1.ed25519.key"), "--signer", "tech1",
                                      "--key", str(keys / "tech1.ed25519.key"), "--mqtt", str(tmp_path / "tech1.toml"))
        assert res.returncode == 0 and json.loads(res.stdout)["status"] == "certified", (res.stdout, res.stderr)
        # The validator's replica now yields m1 for the ACL.
        await asyncio.to_thread(wait_until, lambda: chain_height(tmp_path / "validators" / "v0-registry.db") >= 2,
                                30, "v0's registry replica")
        assert load_members(vcfg).meters == {"m1": AREA}
        # v0 (an account of AREA) reads the area's readings: m1's first one, published once the
        # regenerated ACL lets m1 in, is checked on the stream against the registry chain's key.
        secure.regenerate_acl()
        secure.reload()
        reading = SimMeter(secure.keys["m1"]).next().to_json()

        def preverified() -> bool:
            return any(e["ev"] == "preverify" and e.get("verified") == 1 for e in log_events(tmp_path / "v0.log"))
        async with secure.client("m1") as m1:
            async with asyncio.timeout(30):
                while not preverified():  # resent until the reloaded ACL lets it through
                    await m1.publish(readings_topic(AREA, "m1"), reading, qos=1)
                    await asyncio.sleep(1.0)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(15)


# -- retirement through the registry chain --------------------------------------------------

class RegistryChain:
    """A certified registry chain in real SQLite (registry proposer and four validators
    in process), and a role config whose [registry_chain] replica is its database."""

    def __init__(self, tmp: Path):
        self.ops, self.tech = MeterKey("ops", b"\x41" * 32), MeterKey("tech", b"\x42" * 32)
        genesis = Genesis({"ops": self.ops.public_hex})
        sks = validator_keys()
        vset = validator_set(sks)
        reps = [Replica("registry", RegistryApp(genesis), ChainStore(connect(tmp / f"reg{i}.db")), vset)
                for i in range(5)]
        self.prop, self.voters = reps[0], [Voter(r, i, sk) for i, (r, sk) in enumerate(zip(reps[1:], sks))]
        (tmp / "registry-genesis.toml").write_text(dump_genesis(genesis))
        (tmp / "registry-validators.toml").write_text(dump_validator_set(list(vset.members)))
        self.config = tmp / "validator-like.toml"
        self.config.write_text('[registry_chain]\nvalidators = "registry-validators.toml"\n'
                               'genesis = "registry-genesis.toml"\ndatabase = "reg0.db"\n')
        certify(self.prop, self.voters, [sign_record(node_record(
            ident="tech", role="technician", public_key=self.tech.public_hex, signer="ops", time=NOW),
            self.ops.private)])

    def enroll(self, keys: dict[str, MeterKey]) -> None:
        certify(self.prop, self.voters, [sign_record(enroll_record(
            meter=m, account=f"acct-{m}", area=AREA, public_key=k.public_hex, signer="tech", time=NOW),
            self.tech.private, k.private) for m, k in keys.items()])

    def retire(self, meter: str) -> None:
        certify(self.prop, self.voters, [sign_record(retire_record(
            target="meter", ident=meter, reason="removed", signer="tech", time=NOW), self.tech.private)])


async def test_a_retired_meter_is_cut_off_once_the_acl_is_regenerated_and_mosquitto_reloaded(tmp_path):
    chain = RegistryChain(tmp_path)
    chain.enroll(meter_keys(["m1", "m2"]))
    secure = SecureBroker(tmp_path, registry_config=chain.config)
    try:
        async with secure.client("gw1", tls=False) as gw, secure.client("m2") as m2, secure.client("m1") as m1:
            await gw.subscribe(f"gl/v1/{AREA}/meters/+/readings", qos=1)
            inbox = Inbox(gw)
            await m2.publish(readings_topic(AREA, "m2"), b"before", qos=1)
            assert await inbox.wait_for(readings_topic(AREA, "m2")) == b"before"

            chain.retire("m2")
            summary = secure.regenerate_acl()
            assert summary["meters"] == 1 and summary["registry_height"] == 3
            assert "user m2" not in (secure.dir / "acl").read_text()
            secure.reload()
            await asyncio.sleep(0.5)
            inbox.got.clear()
            await m2.publish(readings_topic(AREA, "m2"), b"after, same session", qos=1)
            async with secure.client("m2") as again:  # and a fresh session fares no better
                await again.publish(readings_topic(AREA, "m2"), b"after, new session", qos=1)
            await m1.publish(readings_topic(AREA, "m1"), b"m1 still", qos=1)
            assert await inbox.wait_for(readings_topic(AREA, "m1")) == b"m1 still"
            await asyncio.sleep(GRACE_S)
            assert inbox.topics() == [readings_topic(AREA, "m1")]
            await inbox.close()
    finally:
        secure.stop()


# -- files, formats, least privilege -----------------------------------------------------------

def test_hashes_agree_with_mosquitto_passwd(tmp_path):
    """A hash mosquitto_passwd wrote verifies here, and ours has its exact shape
    (Mosquitto itself accepting ours is what every test above relies on)."""
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.skip("mosquitto_passwd is not installed")  # the broker tests above still check Mosquitto reads ours
    subprocess.run([exe, "-b", "-c", str(tmp_path / "pw"), "alice", "s3cret"], check=True, capture_output=True)
    theirs = (tmp_path / "pw").read_text().strip().split(":", 1)[1]
    assert check_password("s3cret", theirs) and not check_password("s3creT", theirs)
    ours = hash_password("s3cret")
    assert ours.split("$")[1:3] == theirs.split("$")[1:3] == ["7", "101"]
    assert [len(p) for p in ours.split("$")[3:]] == [len(p) for p in theirs.split("$")[3:]]
    assert check_password("s3cret", ours) and not check_password("s3cret", ours.replace("$7$", "$6$"))
    assert not check_password("s3cret", "garbage")


def test_credentials_keep_only_hashes_in_private_files(tmp_path):
    out = gl_json("broker", "credentials", "add", "--id", "v0", "--role", "validator", "--out", str(tmp_path))
    assert len(out["password"]) >= 32
    for name in ("passwd", "accounts.toml"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
        assert out["password"] not in (tmp_path / name).read_text()
    assert check_password(out["password"], (tmp_path / "passwd").read_text().strip().split(":", 1)[1])
    # The group-readable mode an operator gives the files (for Mosquitto's group) survives
    # a regeneration; a world-readable one does not.
    os.chmod(tmp_path / "passwd", 0o640)
    os.chmod(tmp_path / "accounts.toml", 0o644)
    gl_json("broker", "credentials", "add", "--id", "v1", "--role", "validator", "--out", str(tmp_path))
    assert stat.S_IMODE(os.stat(tmp_path / "passwd").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "accounts.toml").st_mode) == 0o640
    for args, reason in [(["--id", "v0", "--role", "trustee", "--rotate"], "account_mismatch"),
                         (["--id", "nobody", "--role", "meter", "--rotate"], "no_such_account"),
                         (["--id", "bad/id", "--role", "meter"], "bad_id"),
                         (["--id", "s1", "--role", "storage"], "bad_area"),
                         (["--id", "t1", "--role", "trustee", "--area", "area1"], "bad_area"),
                         (["--id", "v2", "--role", "validator", "--area", "bad/area"], "bad_area")]:
        res = gl("broker", "credentials", "add", "--out", str(tmp_path), *args)
        assert res.returncode == 2 and f"error: {reason}:" in res.stderr, (args, res.stderr)


def _allowed(acl: list[tuple[str, str]], access: str, topic: str) -> bool:
    return any(topic_matches_sub(f, topic) and a in (access, "readwrite") for a, f in acl)


def test_each_role_gets_the_topics_its_code_uses_and_no_other():
    """Topics built with the code's own helpers: each role is granted what it
    publishes and subscribes to, and refused a sample of what belongs to others."""
    a, reg, p, r = Topics(AREA), Topics("registry"), Topics(f"P-{AREA}"), Topics(f"R-{AREA}")
    st = StorageTopics(AREA)
    uses = {
        "gateway": ([readings_topic(AREA, "m7")], [ack_topic(AREA, "m7"), nack_topic(AREA, "m7"), a.proposals,
                    a.certs, a.blocks(2), reg.sync]),
        "validator": ([a.proposals, a.certs, a.blocks(0), reg.proposals, p.proposals, r.certs, readings_topic(AREA, "m7")],
                      [a.votes, reg.votes, p.sync]),
        "storage": ([a.certs, a.blocks("s1"), st.requests("s1"), st.responses("s1"), st.store("s1"), st.alive("s2")],
                    [a.sync, st.alive("s1"), st.receipts, st.requests("s2"), st.responses("s2")]),
        "verifier": ([a.certs, st.receipts, st.responses("ver"), st.alive("s1"), p.votes, r.sync],
                     [st.store("s1"), st.requests("s1"), p.proposals, p.certs, p.blocks(1), r.proposals]),
        "trustee": ([REQUESTS_TOPIC], [decisions_topic("t1"), "gl/v1/trustees/t1/key", response_topic("ab" * 32)]),
        "coordinator": ([reg.certs, reg.blocks("c1"), a.certs, response_topic("ab" * 32), st.responses("c1"),
                         "gl/v1/chains/registry/results/" + "cd" * 32],
                        [reg.sync, a.sync, REQUESTS_TOPIC, st.requests("s1"), "gl/v1/chains/registry/submit"]),
        "registry": (["gl/v1/chains/registry/submit", reg.votes, reg.sync],
                     ["gl/v1/chains/registry/results/" + "cd" * 32, reg.proposals, reg.certs, reg.blocks(3)]),
        "technician": (["gl/v1/chains/registry/results/" + "cd" * 32], ["gl/v1/chains/registry/submit"]),
    }
    names = {"storage": "s1", "verifier": "ver", "trustee": "t1", "coordinator": "c1"}
    for role, (reads, writes) in uses.items():
        acc = Account(names.get(role, role), role, AREA if role in ("gateway", "storage", "verifier") else "")
        acl = role_topics(acc)
        assert all(_allowed(acl, "read", t) for t in reads), (role, [t for t in reads if not _allowed(acl, "read", t)])
        assert all(_allowed(acl, "write", t) for t in writes), (role, [t for t in writes
                                                                      if not _allowed(acl, "write", t)])
        # Nobody but the gateway writes acks; only it and validators read readings; nobody but
        # a validator votes; nobody but the registry role answers submissions; no role writes
        # in another area.
        assert _allowed(acl, "write", ack_topic(AREA, "m7")) == (role == "gateway")
        assert _allowed(acl, "read", readings_topic(AREA, "m7")) == (role in ("gateway", "validator"))
        assert _allowed(acl, "write", a.votes) == (role == "validator")
        assert _allowed(acl, "write", "gl/v1/chains/registry/results/x") == (role == "registry")
        assert not _allowed(acl, "write", readings_topic("area2", "m7"))
        assert not any(f.startswith("#") or f.startswith("gl/v1/#") for _, f in acl)
    meter = meter_topics("m1", AREA)
    assert _allowed(meter, "write", readings_topic(AREA, "m1")) and _allowed(meter, "read", ack_topic(AREA, "m1"))
    assert not _allowed(meter, "read", readings_topic(AREA, "m1")) and not _allowed(meter, "write", ack_topic(AREA, "m1"))


def test_a_validator_reads_only_meter_readings_and_with_an_area_only_that_area_s():
    """Pre-verification needs the readings and nothing else of the meters' topics."""
    for area, other_area_readable in (("", True), (AREA, False)):
        acl = role_topics(Account("v0", "validator", area))
        assert _allowed(acl, "read", readings_topic(AREA, "m7"))
        assert _allowed(acl, "read", readings_topic("area2", "m7")) == other_area_readable
        for topic in (ack_topic(AREA, "m7"), nack_topic(AREA, "m7"), f"gl/v1/{AREA}/meters/m7/alerts",
                      f"gl/v1/{AREA}/meters/m7/health", f"gl/v1/{AREA}/meters/m7/events"):
            assert not _allowed(acl, "read", topic) and not _allowed(acl, "write", topic), topic
        assert not _allowed(acl, "write", readings_topic(AREA, "m7"))
    text = render_acl([Account("v0", "validator", AREA)], Members({}))
    assert f"topic read gl/v1/{AREA}/meters/+/readings\n" in text


def test_the_acl_follows_the_registry():
    """Retired nodes and retired (absent) meters get no block; a node id that is also
    an enrolled meter is refused rather than merged."""
    accounts = [Account("gw1", "gateway", AREA), Account("tech9", "technician"), Account("m1", "meter")]
    text = render_acl(accounts, Members({"m1": AREA}, frozenset({"tech9"})))
    assert "user m1\n" in text and "user gw1\n" in text and "user tech9" not in text
    assert "tech9 (technician) is retired" in text
    with pytest.raises(BrokerAuthError) as info:
        render_acl([Account("m1", "technician")], Members({"m1": AREA}))
    assert info.value.reason == "id_clash"


def test_the_testbed_ca_issues_a_p256_server_certificate_with_private_keys(tmp_path):
    paths = make_testbed_ca(tmp_path, ["gw.local", "10.0.0.5"])
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE(os.stat(paths[name]).st_mode) == 0o600
    cert = check_tls(paths["server.crt"], paths["server.key"], paths["ca.crt"])
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert 390 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 398
    with pytest.raises(BrokerAuthError) as info:
        make_testbed_ca(tmp_path, ["gw.local"])
    assert info.value.reason == "exists"
    other = make_testbed_ca(tmp_path / "other", ["gw.local"])
    for cert_, key, ca, reason in [(paths["server.crt"], other["server.key"], paths["ca.crt"], "key_mismatch"),
                                   (other["server.crt"], other["server.key"], paths["ca.crt"], "not_issued_by_ca"),
                                   (paths["ca.key"], paths["server.key"], paths["ca.crt"], "bad_certificate")]:
        with pytest.raises(BrokerAuthError) as info:
            check_tls(cert_, key, ca)
        assert info.value.reason == reason
    res = gl("broker", "config", "--out", str(tmp_path / "b"), "--tls-cert", str(other["server.crt"]),
             "--tls-key", str(other["server.key"]), "--ca", str(paths["ca.crt"]))
    assert res.returncode == 2 and "not_issued_by_ca" in res.stderr and not (tmp_path / "b").exists()


def test_the_registry_can_come_from_each_kind_of_file(tmp_path):
    """A gateway config (static registry), a static registry with an area, `registry show`
    JSON; anything else is refused with a reason (the chain replica is used above)."""
    cfg, _ = make_area(tmp_path, ["m1", "m2"], host="127.0.0.1", port=1883, area="north")
    assert load_members(cfg).meters == {"m1": "north", "m2": "north"}
    assert load_members(tmp_path / "registry.toml", "south").meters == {"m1": "south", "m2": "south"}
    (tmp_path / "show.json").write_text(json.dumps({"chain": "registry", "height": 4, "area": "east",
                                                    "meters": [{"meter": "m7", "account": "a", "public_key": "00"}]}))
    got = load_members(tmp_path / "show.json")
    assert got.meters == {"m7": "east"} and got.height == 4
    (tmp_path / "empty.toml").write_text('[validator]\nname = "v0"\n')
    (tmp_path / "bad.json").write_text('{"meters": 3}')
    (tmp_path / "nochain.toml").write_text('[registry_chain]\nvalidators = "v.toml"\ngenesis = "g.toml"\n'
                                           'database = "missing.db"\n')
    for path, area, reason in [(tmp_path / "registry.toml", None, "no_area"), (tmp_path / "empty.toml", None,
                               "no_registry"), (tmp_path / "bad.json", None, "bad_registry"),
                               (tmp_path / "nochain.toml", None, "no_registry"),
                               (tmp_path / "absent.toml", None, "bad_registry")]:
        with pytest.raises(BrokerAuthError) as info:
            load_members(path, area)
        assert info.value.reason == reason, (path, info.value)
