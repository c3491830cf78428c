# The meter's wall clock and how it was set: every reading carries that as its
# time quality (`tq`, docs/uplink.md), and no reading is stamped before the
# clock has been set at least once (docs/journal.md, "Before the first sync").
import sys
import time
from micropython import const

# 2024-01-01: a board clock that reads earlier has never been set.
CLOCK_SET = 1704067200
# Seconds from 1970 to the port's epoch: embedded ports of older MicroPython
# releases count from 2000 (time.gmtime(0) says which), the wire wants Unix time.
EPOCH = 946684800 if time.gmtime(0)[0] == 2000 else 0
# NTP: once synced, again daily (an RTC drifts seconds a day); until then, a
# try a minute. A try blocks for at most ntptime's socket time-out (1 s).
_NTP_EVERY_S = const(86400)
_NTP_RETRY_S = const(60)


def _ntp(n):
    # ntptime.settime where the port has it; n: the clock config's "ntp" object,
    # {"host": "192.168.1.1"} picks the server (an IP address: a DNS lookup is
    # the one wait no time-out bounds).
    try:
        import ntptime
    except ImportError:
        return None  # the Unix port: the host keeps its own clock
    if n.get("host"):
        ntptime.host = n["host"]
    ntptime.timeout = n.get("timeout_s", 1)
    return ntptime.settime


class Clock:
    # Wall-clock time, optionally accelerated for the testbed: virtual time
    # runs `scale` times faster from (real_start, virtual_start). Both are in
    # the config, so a restarted meter sees the same timeline.
    #
    # quality: "host" (Unix port: the OS keeps the clock), "ntp" (set by NTP
    # since boot), "rtc" (a board clock already set at boot: battery-backed or
    # kept over a soft reset), "unsynced" (a board clock never set). wall and
    # ntp stand in for time.time and ntptime.settime in tests; host says
    # whether an OS keeps the clock (default: the Unix port). cfg "ntp":
    # false turns NTP off, {"host", "timeout_s", "every_s", "retry_s"} tunes it.
    def __init__(self, cfg, wall=None, ntp=None, host=None):
        self.scale = cfg.get("scale", 1)
        self.real0 = cfg.get("real_start", 0)
        self.virt0 = cfg.get("virtual_start", self.real0)
        self._wall = wall or time.time
        if host is None:
            host = sys.platform == "linux"
        n = cfg.get("ntp", {})
        if n is False or (host and ntp is None):
            self._set = None
        else:
            self._set = ntp if ntp is not None else _ntp(n)
            self._every_ms = int(n.get("every_s", _NTP_EVERY_S) * 1000)
            self._retry_ms = int(n.get("retry_s", _NTP_RETRY_S) * 1000)
        if host:
            self.quality = "host"
        else:
            self.quality = "rtc" if self._wall() + EPOCH >= CLOCK_SET else "unsynced"
        self._next_ntp = 0  # uptime ms of the next NTP try
        self._up_ms = 0
        self._tick = time.ticks_ms()

    def _uptime(self):
        # ms since the clock was made, summed from tick differences (the tick
        # counter wraps every 12 days on boards; each difference here is small)
        t = time.ticks_ms()
        self._up_ms += time.ticks_diff(t, self._tick)
        self._tick = t
        return self._up_ms

    def now(self):
        return int(self.virt0 + (self._wall() + EPOCH - self.real0) * self.scale)

    def real_until(self, vt):
        # real seconds until virtual time vt
        return (vt - self.now()) / self.scale

    def synced(self):
        return self.quality != "unsynced"

    def since_boot(self):
        # virtual seconds since the clock was made (the meter's boot), from ticks
        return self._uptime() * self.scale // 1000

    def sync(self, log):
        # One NTP try when one is due; bounded by ntptime's time-out. The meter
        # calls this every loop step.
        if self._set is None or self._uptime() < self._next_ntp:
            return
        try:
            self._set()
        except Exception as e:  # no network yet, no answer: measure on, try later
            self._next_ntp = self._up_ms + self._retry_ms
            if self.quality == "unsynced":
                log("ntp_failed", error=repr(e), retry_ms=self._retry_ms)
            return
        self._next_ntp = self._up_ms + self._every_ms
        if self.quality != "ntp":
            self.quality = "ntp"
            log("ntp_synced", t=self.now())
