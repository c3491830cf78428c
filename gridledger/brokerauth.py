"""Who may do what on the broker: Mosquitto accounts and per-account ACLs, from the registry.

Three files, all for Mosquitto 2 (`docs/broker.md`):

    accounts.toml   [[accounts]] id, role, area: every broker account, no secrets
    passwd          `id:$7$...`, the PBKDF2-SHA512 hashes `mosquitto_passwd` writes
    acl             `user ID` blocks of `topic read|write|readwrite TOPIC` lines

A password is generated here, shown once, and only its hash is kept. The ACL
gives each account only the topics its role uses; meters come from the registry
(an enrolled, unretired meter may publish only under its own topic tree, in its
enrolled area), so regenerating the ACL after a retirement and sending Mosquitto
SIGHUP cuts a retired meter off.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import GridledgerError
from .wire import METER_ID_RE

__all__ = ["ROLES", "AREA_ROLES", "AREA_OPTIONAL", "BrokerAuthError", "Account", "Members", "hash_password", "check_password",
           "new_password", "read_accounts", "read_password_file", "add_credentials", "load_members",
           "role_topics", "meter_topics", "render_acl", "write_acl"]

ROLES = ("meter", "gateway", "validator", "storage", "verifier", "trustee", "coordinator", "registry", "technician")
AREA_ROLES = ("gateway", "storage", "verifier")  # accounts bound to one area (its chain id)
AREA_OPTIONAL = ("validator",)  # may be bound to one area: then it reads only that area's readings
ACCOUNTS, PASSWD, ACL = "accounts.toml", "passwd", "acl"

# Mosquitto 2's `$7$` hash: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte key. The work
# factor stays at mosquitto_passwd's default (101): passwords here carry 192 random
# bits, so stretching adds nothing, and a Pi pays it on every (re)connect of every meter.
HASH_ITERATIONS = 101
SALT_BYTES = 12
PASSWORD_BYTES = 24


class BrokerAuthError(GridledgerError):
    """A refused account, registry or file, with a stable `reason`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- passwords -------------------------------------------------------------------------

def hash_password(password: str, *, salt: bytes | None = None, iterations: int = HASH_ITERATIONS) -> str:
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def check_password(password: str, encoded: str) -> bool:
    """Does `password` match a `$7$` hash? False on anything malformed."""
    try:
        _, seven, iterations, salt, dk = encoded.split("$")
        if seven != "7":
            return False
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt, validate=True),
                                  int(iterations))
        return hmac.compare_digest(got, base64.b64decode(dk, validate=True))
    except (ValueError, TypeError):
        return False


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


# -- accounts --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Account:
    id: str
    role: str
    area: str = ""   # gateway, storage, verifier: the area (chain id) they serve

    def check(self) -> None:
        if not METER_ID_RE.match(self.id):
            raise BrokerAuthError("bad_id", f"account id {self.id!r} must match [A-Za-z0-9_-]{{1,32}}")
        if self.role not in ROLES:
            raise BrokerAuthError("bad_role", f"{self.id}: role {self.role!r} is not one of {', '.join(ROLES)}")
        if self.role not in AREA_OPTIONAL and (self.role in AREA_ROLES) != bool(self.area):
            need = "needs --area" if self.role in AREA_ROLES else "takes no area"
            raise BrokerAuthError("bad_area", f"{self.id}: a {self.role} account {need}")
        if self.area and not METER_ID_RE.match(self.area):
            raise BrokerAuthError("bad_area", f"{self.id}: area {self.area!r} must match [A-Za-z0-9_-]{{1,32}}")


def read_accounts(folder: Path) -> list[Account]:
    path = Path(folder) / ACCOUNTS
    if not path.exists():
        return []
    try:
        accounts = [Account(a["id"], a["role"], a.get("area", "")) for a in tomllib.loads(path.read_text())["accounts"]]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise BrokerAuthError("bad_accounts_file", f"{path}: [[accounts]] with id and role ({exc})") from None
    for a in accounts:
        a.check()
    return accounts


def read_password_file(path: Path) -> dict[str, str]:
    """id -> hash, in file order."""
    out: dict[str, str] = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                ident, sep, encoded = line.partition(":")
                if not sep:
                    raise BrokerAuthError("bad_password_file", f"{path}: a line is ID:HASH")
                out[ident] = encoded
    return out


def _write_private(path: Path, text: str) -> None:
    """Replace `path` atomically (Mosquitto never reads half a file). A new file is
    0600; a replaced one keeps its group and mode, less any bit for others, so the
    `chgrp mosquitto; chmod 0640` an operator did once survives every regeneration."""
    mode, gid = 0o600, -1
    if path.exists():
        st = path.stat()
        mode, gid = stat.S_IMODE(st.st_mode) & 0o640, st.st_gid
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.chown(tmp, -1, gid)
        os.chmod(tmp, mode)
    except PermissionError as exc:
        os.unlink(tmp)
        raise BrokerAuthError("file_permissions", f"cannot give {path}'s group and mode to its new version "
                                                  f"({exc}): run as the file's owner, or root") from None
    os.replace(tmp, path)


def _dump_accounts(accounts: list[Account]) -> str:
    out = ["# gridledger broker accounts: role (and area) per account; passwords are in passwd, hashed", ""]
    for a in accounts:
        out += ["[[accounts]]", f'id = "{a.id}"', f'role = "{a.role}"'] + ([f'area = "{a.area}"'] if a.area else [])
        out.append("")
    return "\n".join(out)


def add_credentials(folder: Path, account: Account, *, rotate: bool = False) -> str:
    """Create (or with `rotate`, replace) `account`'s password; returns it, keeps its hash."""
    account.check()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    accounts = {a.id: a for a in read_accounts(folder)}
    hashes = read_password_file(folder / PASSWD)
    old = accounts.get(account.id)
    if (old is not None or account.id in hashes) and not rotate:
        raise BrokerAuthError("account_exists", f"{account.id} already has a password; --rotate replaces it")
    if rotate and old is None:
        raise BrokerAuthError("no_such_account", f"{account.id} has no account to rotate")
    if old is not None and old != account:
        raise BrokerAuthError("account_mismatch", f"{account.id} is a {old.role}{' of ' + old.area if old.area else ''}"
                                                  "; a rotation keeps role and area")
    password = new_password()
    hashes[account.id] = hash_password(password)
    accounts[account.id] = account
    # The hash file first: an account listed without a password cannot log in, the reverse could.
    _write_private(folder / PASSWD, "".join(f"{i}:{h}\n" for i, h in hashes.items()))
    _write_private(folder / ACCOUNTS, _dump_accounts(list(accounts.values())))
    return password


# -- the registry, as the ACL needs it ----------------------------------------------------

@dataclass(frozen=True, slots=True)
class Members:
    """What the registry says at its latest height: active meters and retired nodes."""
    meters: dict[str, str]                               # meter id -> area, enrolled and not retired
    retired_nodes: frozenset[str] = frozenset()
    registry_chain: str = "registry"
    source: str = ""
    height: int | None = None                            # registry chain height read, if a chain


def load_members(path: Path, area: str | None = None) -> Members:
    """Registry members from a role config with `[registry_chain]` (its replica,
    read-only), a gateway config with a static `registry = FILE`, a static registry
    TOML (`[[meters]]`, with `area`), or `gridledger registry show` JSON output."""
    from aggregator.registry import load_registry
    from .config import read_toml
    from .errors import ConfigError
    path = Path(path)
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text())
            return Members({m["meter"]: doc["area"] for m in doc["meters"]}, source=str(path),
                           registry_chain=doc.get("chain", "registry"), height=doc.get("height"))
        doc = read_toml(path)
        if "registry_chain" in doc:
            return _chain_members(path, doc)
        static = path
        if "meters" not in doc:
            gw = doc.get("gateway", {})
            if not gw.get("registry"):
                raise BrokerAuthError("no_registry", f"{path}: neither [registry_chain], [gateway] registry "
                                                     "nor [[meters]]")
            static, area = (path.parent / gw["registry"]).resolve(), area or gw.get("area")
        if not area:
            raise BrokerAuthError("no_area", f"{static} is a static registry: give the area its meters are in")
        return Members({e.meter: area for e in load_registry(static)}, source=str(static))
    except ConfigError as exc:
        raise BrokerAuthError("bad_registry", str(exc)) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BrokerAuthError("bad_registry", f"{path}: {exc}") from None


def _chain_members(path: Path, doc: dict) -> Members:
    from certlog.store import ChainStore
    from coordinator.registry import RegistryChainSettings
    from coordinator.registryapp import RegistryHistory
    rc = RegistryChainSettings.from_doc(doc, path.parent)
    if not rc.database.exists():
        raise BrokerAuthError("no_registry", f"{rc.database} does not exist: has the role followed the registry?")
    with sqlite3.connect(f"file:{rc.database}?mode=ro", uri=True, timeout=10) as conn:
        history = RegistryHistory.from_store(ChainStore(conn), rc.chain)
    return Members(history.active_meters(), frozenset(history.retired_nodes()), rc.chain, str(rc.database),
                   history.height)


# -- the ACL ---------------------------------------------------------------------------

def meter_topics(meter: str, area: str) -> list[tuple[str, str]]:
    """A meter publishes only under its own topic tree and reads only its own answers."""
    base = f"gl/v1/{area}/meters/{meter}/"
    return ([("write", base + t) for t in ("readings", "alerts", "health", "events")]
            + [("read", base + t) for t in ("ack", "nack")])


def _proposer(chain: str) -> list[tuple[str, str]]:
    c = f"gl/v1/chains/{chain}/"
    return ([("write", c + t) for t in ("proposals", "certs", "blocks/+")]
            + [("read", c + t) for t in ("votes", "sync")])


def _follower(chain: str) -> list[tuple[str, str]]:
    # Certified blocks are the consortium's common data: a follower may read every
    # catch-up answer on its chain, not only those addressed to its own name.
    c = f"gl/v1/chains/{chain}/"
    return [("read", c + "certs"), ("read", c + "blocks/+"), ("write", c + "sync")]


def role_topics(a: Account, registry_chain: str = "registry") -> list[tuple[str, str]]:
    """(access, topic filter) for a node account: the topics its role's code uses."""
    reg = f"gl/v1/chains/{registry_chain}/"
    submit = [("write", reg + "submit"), ("read", reg + "results/+")]
    if a.role == "gateway":
        # Its area's meters (readings in, acks out; the serial bridge, run with the
        # gateway's config, also publishes wired meters' readings), its area chain, the registry.
        return ([("readwrite", f"gl/v1/{a.area}/meters/#")] + _proposer(a.area) + _follower(registry_chain))
    if a.role == "validator":
        # Votes on every chain of the consortium: area, registry, P and R chains. Reads
        # meters' readings (only those: no acks, alerts or health) to check their
        # signatures before a proposal carries them; of its area only, if it has one.
        return [("read", "gl/v1/chains/+/proposals"), ("read", "gl/v1/chains/+/certs"),
                ("read", "gl/v1/chains/+/blocks/+"), ("write", "gl/v1/chains/+/votes"),
                ("write", "gl/v1/chains/+/sync"), ("read", f"gl/v1/{a.area or '+'}/meters/+/readings")]
    if a.role == "storage":
        s = f"gl/v1/storage/{a.area}/"
        return (_follower(a.area) + [("read", s + f"{a.id}/{t}") for t in ("req", "resp", "store")]
                + [("read", s + "+/alive"), ("write", s + f"{a.id}/alive"), ("write", s + "receipts"),
                   ("write", s + "+/req"), ("write", s + "+/resp")])
    if a.role == "verifier":
        s = f"gl/v1/storage/{a.area}/"
        return ([("read", f"gl/v1/chains/{a.area}/certs")] + _proposer(f"P-{a.area}") + _proposer(f"R-{a.area}")
                + [("read", s + "receipts"), ("read", s + f"{a.id}/resp"), ("read", s + "+/alive"),
                   ("write", s + "+/store"), ("write", s + "+/req")])
    if a.role == "trustee":
        t = "gl/v1/trustees/"
        return [("read", t + "requests"), ("write", t + f"{a.id}/decisions"), ("write", t + f"{a.id}/key"),
                ("write", t + "responses/+")]
    if a.role == "coordinator":
        t = "gl/v1/trustees/"
        return (_follower("+") + submit
                + [("write", t + "requests"), ("read", t + "responses/+"), ("read", t + "+/decisions"),
                   ("read", t + "+/key"), ("write", "gl/v1/storage/+/+/req"), ("read", f"gl/v1/storage/+/{a.id}/resp")])
    if a.role == "registry":
        return ([("read", reg + "submit"), ("write", reg + "results/+")] + _proposer(registry_chain))
    if a.role == "technician":
        return submit
    return []  # meters get theirs from the registry


def render_acl(accounts: list[Account], members: Members) -> str:
    """The Mosquitto ACL file: one `user` block per account that may do anything.

    Meters: every enrolled, unretired meter (its account's password gates the
    connection). Nodes: every account in accounts.toml, except one whose id the
    registry has retired."""
    out = [f"# generated by `gridledger broker acl` from {members.source or 'the registry'}"
           + (f" at registry height {members.height}" if members.height is not None else ""),
           "# regenerate after any enrollment or retirement, then: kill -HUP $(pidof mosquitto)", ""]
    for meter, area in sorted(members.meters.items()):
        out += [f"user {meter}"] + [f"topic {acc} {t}" for acc, t in meter_topics(meter, area)] + [""]
    for a in sorted(accounts, key=lambda a: (a.role, a.id)):
        if a.role == "meter":
            continue
        if a.id in members.retired_nodes:
            out += [f"# {a.id} ({a.role}) is retired in the registry: no access", ""]
            continue
        if a.id in members.meters:
            raise BrokerAuthError("id_clash", f"{a.id} is both a {a.role} account and an enrolled meter")
        out += [f"# {a.role}" + (f" of {a.area}" if a.area else ""), f"user {a.id}"]
        out += [f"topic {acc} {t}" for acc, t in role_topics(a, members.registry_chain)] + [""]
    return "\n".join(out)


def write_acl(path: Path, text: str) -> None:
    _write_private(Path(path), text)
