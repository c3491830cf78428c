# What every sensor driver shares: cumulative Wh per direction (totals), the
# interval energy the meter asks for (differences of totals, never negative),
# and fault reporting. A driver only has to say how to read its totals.


class SensorFault(Exception):
    # A sensor that could not be read. reason: timeout, short_frame, bad_crc,
    # bad_frame, device_error (docs/sensors.md).
    def __init__(self, reason, detail=""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class ConfigError(ValueError):
    # A sensor config the firmware refuses at boot (unknown type, missing pin...).
    def __init__(self, reason, detail):
        super().__init__("sensor config: %s: %s" % (reason, detail))
        self.reason = reason
        self.detail = detail


def _quiet(ev, **kw):
    pass


class Sensor:
    kind = "?"
    # Most power the sensor can see (W): a counter that goes backwards is taken
    # as a roll-over only if the energy that implies fits in the elapsed time.
    max_w = 0
    wrap = 0  # Wh at which the device's own counter rolls over; 0: it does not

    def __init__(self, log=None, temp=None):
        self._log = log or _quiet
        self._temp = temp
        self._last = None  # totals at the previous energy() call
        self._t_last = None
        self.fault = None  # the SensorFault of the last failed read, until a good one

    def totals(self):
        # (import_wh, export_wh) as ints, cumulative; raises SensorFault
        raise NotImplementedError

    def power_w(self):
        # instantaneous W, positive importing, negative exporting; None: unknown
        return None

    def temp_c(self):
        return self._temp.read_c() if self._temp is not None else None

    def poll(self):
        # called every main-loop step: drivers that sample do it here
        pass

    def checkpoint(self):
        # The totals the last energy() counted up to: persist them with the
        # reading, hand them to resume() after a reboot.
        return self._last

    def resume(self, import_wh, export_wh):
        # Right after boot, before the first energy(): the checkpoint persisted
        # with the last reading, so the first interval counts from there.
        self._last = (import_wh, export_wh)

    def _baseline(self):
        try:
            self._last = self.totals()
        except SensorFault as e:
            self._failed(e)

    def _failed(self, e):
        if self.fault is None or self.fault.reason != e.reason:
            self._log("sensor_fault", sensor=self.kind, reason=e.reason, detail=e.detail)
        self.fault = e

    def energy(self, t0, t1):
        # Wh imported and exported since the previous call. A failed read
        # returns (0, 0) and keeps the previous totals, so the next good read
        # carries the energy of both intervals: nothing is lost, only late.
        try:
            now = self.totals()
        except SensorFault as e:
            self._failed(e)
            return 0, 0
        if self.fault is not None:
            self._log("sensor_ok", sensor=self.kind, after=self.fault.reason)
            self.fault = None
        span = t1 - (t0 if self._t_last is None else self._t_last)
        self._t_last = t1
        last = self._last
        self._last = now
        if last is None:
            return 0, 0  # first good read: it only sets the baseline
        return (self._delta("import", last[0], now[0], span),
                self._delta("export", last[1], now[1], span))

    def _delta(self, direction, prev, now, span):
        if now >= prev:
            return now - prev
        rolled = now + self.wrap - prev
        if self.wrap and rolled <= self.max_w * max(span, 1) // 3600 + 1:
            self._log("counter_wrap", sensor=self.kind, direction=direction, prev=prev, now=now)
            return rolled
        # Reset (by a technician, a replaced device, lost memory): what was
        # counted between the last read and the reset is unknowable; count on
        # from zero rather than invent energy or go negative.
        self._log("counter_reset", sensor=self.kind, direction=direction, prev=prev, now=now)
        return now

