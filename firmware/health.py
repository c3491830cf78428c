# The meter's health message (docs/uplink.md), the same for both uplinks: what
# the meter knows (its status callback) plus what only the device can tell.
# The uplinks import it (and answers.py) on first use, not at boot: booting,
# with the sensor drivers being loaded, is the tightest moment for the heap.
import gc
import sys
import time

import version


def _reset_cause():
    try:
        import machine
        cause = machine.reset_cause()
    except (ImportError, AttributeError):
        return None  # the Unix port has no reset cause
    for name in ("PWRON_RESET", "HARD_RESET", "WDT_RESET", "DEEPSLEEP_RESET", "SOFT_RESET"):
        if getattr(machine, name, None) == cause:
            return name[:-6].lower()
    return cause


def _rssi():
    try:
        import network
        wlan = network.WLAN(network.STA_IF)
        return wlan.status("rssi") if wlan.isconnected() else None
    except Exception:
        return None  # no Wi-Fi (a wired Pico, the Unix port)


def _clock_quality():
    # The meter's own report wins (status "clock"); otherwise: the Unix port
    # reads the host's clock, which the OS keeps in sync, and a board whose
    # clock still reads before 2024 has never been set.
    if sys.platform == "linux":
        return "host"
    return "unsynced" if time.time() < 1704067200 else "rtc"


def report(meter, status, log, up_ms, last_acked, reconnects, alerts):
    st = {}
    if status is not None:
        try:
            st = status()
        except Exception as e:
            log("status_failed", error=repr(e))
    return {
        "v": 1, "meter": meter, "state": "online", "fw": version.FIRMWARE,
        "up_s": up_ms // 1000,
        "mem_free": gc.mem_free(),
        "seq": st.get("seq"),
        "journal_depth": st.get("journal_depth", st.get("spooled")),
        "journal_full": st.get("journal_full", False),
        "dropped": st.get("dropped", 0),
        "last_acked": st.get("last_acked", last_acked),
        "reset_cause": _reset_cause(),
        "rssi": _rssi(),
        "clock": st.get("clock", _clock_quality()),
        "reconnects": reconnects,
        "alerts_pending": len(alerts.pending) if alerts is not None else 0,
        "alerts_dropped": alerts.dropped if alerts is not None else 0,
    }
