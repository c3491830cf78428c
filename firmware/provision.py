# On-device provisioning: the meter's Ed25519 key is made here, from the
# board's own random source, and never leaves the board. The host (flash.sh,
# over mpremote) only ever gets the public key, signatures under domains that
# can never be mistaken for a reading, and a self-test report.
#
# The host calls run('{"op": ...}'); the answer is one line "GLPROV {json}".
import binascii
import gc
import json
import os
import sys
import time

import ed25519
import wire
from netup import boot, wifi_up  # noqa: F401  (the self-test joins; tests call boot here)

KEY = "ed25519.key"
CONFIG = "config.json"
FIRMWARE = "firmware.json"
# What the device signs for the host. Readings' signed bytes start with
# "gl-reading-v1", so neither of these can be replayed as a reading.
DOMAIN_ENROLL = b"gridledger registry v1 meter\n"  # coordinator/registryapp.py DOMAIN_METER
DOMAIN_SELFTEST = b"gridledger selftest v1\n"
TAG = "GLPROV "


class ProvisionError(Exception):
    # args: (reason, detail); the reason is machine-readable
    pass


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _read_json(path):
    if not _exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _hex(b):
    return wire.hexs(b)


def _unhex(s, what):
    try:
        return binascii.unhexlify(s)
    except Exception:
        raise ProvisionError("bad_hex", what + " is not hex")


def _key(path=KEY):
    if not _exists(path):
        raise ProvisionError("no_key", "no key on the device: run keygen first")
    with open(path, "rb") as f:
        seed = f.read()
    return ed25519.SigningKey(seed)


def keygen(rotate=False, path=KEY):
    # An existing key is kept unless rotate is asked for: re-running a
    # provisioning must not change an enrolled meter's identity.
    if _exists(path) and not rotate:
        return {"created": False, "public_key": pubkey(path)}
    seed = os.urandom(32)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(seed)
    os.rename(tmp, path)
    return {"created": True, "rotated": bool(rotate), "public_key": _hex(ed25519.SigningKey(seed).public)}


def pubkey(path=KEY):
    return _hex(_key(path).public)


def sign_enrollment(msg_hex):
    # Proof of possession for the registry: only an enrollment record that
    # names this device's own public key is signed.
    msg = _unhex(msg_hex, "enrollment")
    if msg[:len(DOMAIN_ENROLL)] != DOMAIN_ENROLL:
        raise ProvisionError("bad_domain", "not an enrollment message")
    try:
        rec = json.loads(msg[len(DOMAIN_ENROLL):])
    except Exception:
        raise ProvisionError("bad_record", "enrollment body is not JSON")
    key = _key()
    if not isinstance(rec, dict) or rec.get("kind") != "enroll" or rec.get("public_key") != _hex(key.public):
        raise ProvisionError("not_my_key", "the record does not enroll this device's key")
    return {"public_key": _hex(key.public), "signature": _hex(key.sign(msg))}


def _check(fn, *args):
    try:
        out = fn(*args)
        out["ok"] = out.get("ok", True)
        return out
    except ProvisionError as e:
        return {"ok": False, "error": e.args[1]}
    except Exception as e:
        return {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}


def _config():
    if not _exists(CONFIG):
        raise ProvisionError("no_config", "no config.json: run ./flash.sh provision")
    with open(CONFIG) as f:
        cfg = json.load(f)
    n = int(cfg["paillier"]["n"])
    kid = wire.kid_of(n)
    if cfg["paillier"].get("kid", kid) != kid:
        return {"ok": False, "error": "paillier kid does not match n", "meter": cfg.get("meter")}
    return {"meter": cfg["meter"], "area": cfg["area"], "kid": kid}


def _sign(nonce_hex):
    key = _key()
    msg = DOMAIN_SELFTEST + _unhex(nonce_hex, "nonce")
    return {"public_key": _hex(key.public), "signature": _hex(key.sign(msg))}


def _encrypt(n, m):
    import paillier
    pool = paillier.RhoPool(int(n), 1)
    t0 = time.ticks_ms()
    c, _ = pool.encrypt(m)
    return {"c": "%x" % c, "ms": time.ticks_diff(time.ticks_ms(), t0)}


def _sensor(cfg):
    # One read through the meter's own driver: the board-profile drivers
    # (sensors.make, whose totals() raises on a dead sensor) where the bundle
    # has them, else the meter's built-in simulator.
    scfg = cfg.get("sensor", {})
    try:
        import boards
        import sensors
    except ImportError:
        from meter import _make_sensor
        t = int(time.time())
        imp, exp = _make_sensor(scfg).energy(t - 60, t)
        return {"type": scfg.get("type", "sim"), "import_wh": imp, "export_wh": exp, "span": "the last 60 s"}
    s = sensors.make(scfg, boards.select(cfg), lambda ev, **kw: None)
    imp, exp = s.totals()
    return {"type": scfg.get("type", "sim"), "import_wh": imp, "export_wh": exp, "span": "the sensor's totals"}


def _broker(cfg, timeout_s):
    import socket
    wifi_up(cfg, 15000)
    b = cfg["broker"]
    addr = socket.getaddrinfo(b["host"], b.get("port", 1883))[0][-1]
    s = socket.socket()
    s.settimeout(timeout_s)
    t0 = time.ticks_ms()
    try:
        s.connect(addr)
    finally:
        s.close()
    return {"host": b["host"], "port": b.get("port", 1883), "ms": time.ticks_diff(time.ticks_ms(), t0)}


def selftest(nonce_hex, n, m, timeout_s=3):
    # Every check runs, whatever the others do; the host judges signature and
    # ciphertext (it holds the public key and the throw-away Paillier key).
    # The encryption runs first and each check after a collection: the pool's
    # boot wants 1 KB blocks, and a heap that an interactive session and the
    # checks before it have left in small pieces could refuse one with 20 KB
    # free (it did, once in a CI run, on a 128 KiB virtual board).
    gc.collect()
    checks = {"encrypt": _check(_encrypt, n, m)}
    gc.collect()
    checks["config"] = _check(_config)
    cfg = _read_json(CONFIG) if checks["config"]["ok"] else {}
    gc.collect()
    checks["sign"] = _check(_sign, nonce_hex)
    gc.collect()
    checks["sensor"] = _check(_sensor, cfg)
    checks["clock"] = {"ok": True, "time": time.time()}
    gc.collect()
    checks["broker"] = _check(_broker, cfg, timeout_s) if cfg else {"ok": False, "error": "no config"}
    gc.collect()
    checks["memory"] = {"ok": True, "free": gc.mem_free()}
    return checks


def info():
    # What the host needs to know before it acts: the firmware installed, and
    # which meter this board is (a public key and a meter id, nothing secret).
    cfg = _read_json(CONFIG) or {}
    return {"platform": sys.platform, "version": ".".join(str(v) for v in sys.implementation.version[:3]),
            "machine": getattr(sys.implementation, "_machine", ""), "firmware": _read_json(FIRMWARE),
            "meter": cfg.get("meter"), "public_key": pubkey() if _exists(KEY) else None}


def run(request):
    # The one entry point the host uses: a JSON request, a tagged JSON answer.
    try:
        req = json.loads(request)
        op = req.get("op")
        if op == "keygen":
            out = keygen(req.get("rotate", False))
        elif op == "pubkey":
            out = {"public_key": pubkey()}
        elif op == "sign_enrollment":
            out = sign_enrollment(req["msg"])
        elif op == "selftest":
            out = selftest(req["nonce"], req["n"], req["m"], req.get("timeout_s", 3))
        elif op == "info":
            out = info()
        else:
            raise ProvisionError("bad_op", "unknown op %s" % op)
        out = {"ok": True, "result": out}
    except ProvisionError as e:
        out = {"ok": False, "reason": e.args[0], "error": e.args[1]}
    except Exception as e:
        out = {"ok": False, "reason": "device_error", "error": "%s: %s" % (type(e).__name__, e)}
    print(TAG + json.dumps(out))
