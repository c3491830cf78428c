# Pulse inputs: a meter's S0 output (an opto-isolated switch, active low with a
# pull-up) or its LED seen by a photodiode/phototransistor module. Each channel
# counts pulses in a pin interrupt; import and export are separate channels.
import time

from sensors.base import Sensor


class PulseChannel:
    # Counts a pulse when the line goes back to idle after being active for at
    # least min_ms: contact bounce and spikes shorter than that are ignored.
    # The handler may run as a hard IRQ, so it allocates nothing: it only
    # compares and stores small ints.
    def __init__(self, pin, min_ms, active=0, ticks_ms=time.ticks_ms):
        self.count = 0
        self.at = None  # ticks of the last counted pulse, and the one before
        self.before = None
        self._pin = pin
        self._min = min_ms
        self._active = active
        self._ticks = ticks_ms
        self._on = False
        self._since = 0
        pin.irq(trigger=pin.IRQ_FALLING | pin.IRQ_RISING, handler=self._edge, hard=True)

    def _edge(self, pin):
        now = self._ticks()
        if pin.value() == self._active:
            if not self._on:
                self._on = True
                self._since = now
        elif self._on:
            self._on = False
            if time.ticks_diff(now, self._since) >= self._min:
                self.count += 1
                self.before = self.at
                self.at = now


class Pulse(Sensor):
    kind = "pulse"

    def __init__(self, import_pin, export_pin=None, per_kwh=1000, min_ms=20, active=0,
                 log=None, temp=None, ticks_ms=time.ticks_ms):
        super().__init__(log, temp)
        if not 1 <= per_kwh <= 100000:
            raise ValueError("pulse per_kwh must be 1..100000")
        self.per_kwh = per_kwh
        self._ticks = ticks_ms
        self.imp = PulseChannel(import_pin, min_ms, active, ticks_ms)
        self.exp = PulseChannel(export_pin, min_ms, active, ticks_ms) if export_pin is not None else None
        self._base = (0, 0)
        self._baseline()

    def _wh(self, ch):
        # integer floor of the whole count: fractions of a Wh carry over exactly
        return ch.count * 1000 // self.per_kwh if ch is not None else 0

    def totals(self):
        return self._base[0] + self._wh(self.imp), self._base[1] + self._wh(self.exp)

    def resume(self, import_wh, export_wh):
        # Pulses live in RAM: the checkpoint becomes the base, and pulses
        # counted since boot are energy after it.
        self._base = (import_wh, export_wh)
        super().resume(import_wh, export_wh)

    def power_w(self):
        # From the gap between the last two pulses of the direction that pulsed
        # last; when its next pulse is overdue, the time since the last one
        # bounds the power from above. Exporting reads negative.
        ch, sign = self.imp, 1
        e = self.exp
        if e is not None and e.at is not None and (ch.at is None or time.ticks_diff(e.at, ch.at) > 0):
            ch, sign = e, -1
        if ch.before is None:
            return 0
        gap = max(time.ticks_diff(ch.at, ch.before), time.ticks_diff(self._ticks(), ch.at), 1)
        return sign * (3600000000 // (self.per_kwh * gap))
