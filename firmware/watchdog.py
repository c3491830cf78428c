# The hardware watchdog (machine.WDT): resets the board when the main loop stops
# completing. Armed by the first feed, i.e. after the first whole loop, so a
# slow boot (keys, journal recovery) is not cut short; once armed it cannot be
# stopped (RP2040 and ESP32 alike). Ports without machine.WDT (the Unix port)
# run without one and say so once.


class Watchdog:
    def __init__(self, board, timeout_ms=None, log=None, wdt=None):
        self._log = log or (lambda ev, **kw: None)
        self._wdt = None
        self._make = wdt
        self.timeout_ms = None
        limit = board["watchdog"]
        # Checked on every board, the Unix port too: a config that passes the
        # testbed must not fail on the first real board.
        if timeout_ms is not None and timeout_ms != 0 and \
                (isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 1000):
            raise ValueError("watchdog_ms must be an int >= 1000 (or 0 for none), got %r" % (timeout_ms,))
        if timeout_ms == 0:
            self._off("disabled by config (watchdog_ms = 0)")
            return
        if limit is None:
            self._off("board %s has no watchdog" % board["id"])
            return
        ms = limit["default_ms"] if timeout_ms is None else timeout_ms
        if ms > limit["max_ms"]:
            self._log("watchdog_clamped", asked_ms=ms, max_ms=limit["max_ms"], board=board["id"])
            ms = limit["max_ms"]
        if self._make is None:
            try:
                from machine import WDT
                self._make = WDT
            except ImportError:
                self._off("this port has no machine.WDT")
                return
        self.timeout_ms = ms

    def _off(self, why):
        self._make = None
        self._log("watchdog_off", why=why)

    def feed(self):
        # Call once per completed main loop, never from a timer or an IRQ: a
        # feed from anywhere else would keep a hung loop alive.
        if self._wdt is not None:
            self._wdt.feed()
        elif self._make is not None:
            self._wdt = self._make(timeout=self.timeout_ms)
            self._log("watchdog_armed", timeout_ms=self.timeout_ms)
