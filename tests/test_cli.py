"""The CLI: every command documented with an example; key commands write safe files."""

import os
import stat
import subprocess
import sys

import pytest

from aggregator.registry import load_registry
from gridledger.cli import EXAMPLES, main
from gridledger.paillier import load_private, load_public


def gl(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gridledger", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_command_has_help_with_an_example(command):
    res = gl(*command.split(), "--help")
    assert res.returncode == 0
    assert "example: " + EXAMPLES[command] in " ".join(res.stdout.split())


def test_keys_paillier_writes_a_usable_pair(tmp_path):
    """The public key loads with a matching kid; the private key is 0600 and decrypts."""
    res = gl("keys", "paillier", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    pub = load_public(tmp_path / "paillier.pub.json")
    priv = load_private(tmp_path / "paillier.key.json")
    assert pub.bits >= 2048 and pub.kid in res.stdout
    assert stat.S_IMODE(os.stat(tmp_path / "paillier.key.json").st_mode) == 0o600
    assert priv.decrypt(pub.to_phe().encrypt(42)) == 42


def test_keys_paillier_refuses_short_moduli(tmp_path, capsys):
    assert main(["keys", "paillier", "--out", str(tmp_path), "--bits", "1024"]) == 2
    assert "at least 2048" in capsys.readouterr().err


def test_keys_meter_enrolls_and_refuses_duplicates(tmp_path, capsys):
    """A meter key is 0600 and enrolled; enrolling the same id again is refused without touching the registry."""
    reg = tmp_path / "registry.toml"
    assert main(["keys", "meter", "--meter", "m01", "--out", str(tmp_path), "--account", "a1", "--registry", str(reg)]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "m01.ed25519.key").st_mode) == 0o600
    before = reg.read_text()
    assert [e.meter for e in load_registry(reg)] == ["m01"]
    os.unlink(tmp_path / "m01.ed25519.key")
    assert main(["keys", "meter", "--meter", "m01", "--out", str(tmp_path), "--registry", str(reg)]) == 2
    assert "registered twice" in capsys.readouterr().err
    assert reg.read_text() == before
    assert not (tmp_path / "m01.ed25519.key").exists()


def test_bad_meter_id_is_refused(tmp_path, capsys):
    assert main(["keys", "meter", "--meter", "bad id", "--out", str(tmp_path)]) == 2


def test_flash_sh_builds_and_reports_usage_errors(tmp_path):
    """flash.sh build compiles the bundle; --dry-run changes nothing; an unknown command exits 2."""
    from conftest import ROOT
    out = tmp_path / "fw"
    dry = subprocess.run([str(ROOT / "flash.sh"), "--dry-run", "build", "--out", str(out)], capture_output=True, text=True)
    assert dry.returncode == 0 and "would run:" in dry.stdout and not out.exists()
    res = subprocess.run([str(ROOT / "flash.sh"), "build", "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (out / "meter.mpy").exists() and (out / "umqtt" / "simple.mpy").exists()
    bad = subprocess.run([str(ROOT / "flash.sh"), "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
