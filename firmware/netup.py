# Joining the board's Wi-Fi at boot, apart from provision.py: main.py imports
# only this, so the meter does not start with the provisioning code (and the
# Ed25519 and Paillier code it pulls in) loaded early and then freed, which
# leaves holes that fragment a small heap.
import json
import time

CONFIG = "config.json"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def wifi_up(cfg, wait_ms=0):
    # Join the configured Wi-Fi ("wifi": {"ssid", "password"}). With wait_ms 0
    # only start joining: the uplink's back-off retries until the link is up,
    # and a board out of range goes on measuring. Ports without a radio (the
    # Unix port, a plain Pico) have no network module: nothing to do.
    try:
        import network
    except ImportError:
        return False
    w = cfg.get("wifi")
    if not w:
        return False
    sta = network.WLAN(network.STA_IF)
    sta.active(True)
    if sta.isconnected():
        return True
    sta.connect(w["ssid"], w["password"])
    t0 = time.ticks_ms()
    while wait_ms and not sta.isconnected():
        if time.ticks_diff(time.ticks_ms(), t0) > wait_ms:
            raise OSError("wifi %s: not connected after %d ms" % (w["ssid"], wait_ms))
        time.sleep_ms(100)
    return sta.isconnected()


def boot(path=CONFIG):
    # main.py calls this before the meter starts; it must never stop the boot.
    try:
        import network  # noqa: F401  (no radio: nothing to read or join)
    except ImportError:
        return
    try:
        wifi_up(_read_json(path) or {})
    except Exception as e:
        print(json.dumps({"ev": "wifi_down", "error": repr(e)}))
