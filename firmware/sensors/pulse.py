# Pulse inputs: a meter's S0 output (an opto-isolated switch, active low with a
# pull-up) or its LED seen by a photodiode/phototransistor module. Import and
# export are separate channels: a pin interrupt each, or on the ESP32 a
# hardware pulse counter each.
import time

from sensors.base import Sensor

KEYS = ("import_pin", "export_pin", "per_kwh", "debounce_ms", "active", "hw_counter")


class PulseChannel:
    # Counts a pulse when the line goes back to idle after being active for at
    # least min_ms: contact bounce and spikes shorter than that are ignored.
    # The handler runs as a hard IRQ where the port has them (RP2040), so it
    # allocates nothing: it only compares and stores small ints.
    def __init__(self, pin, min_ms, active=0, ticks_ms=time.ticks_ms):
        self.count = 0
        self.at = None  # ticks of the last counted pulse, and the one before
        self.before = None
        self._min = min_ms
        self._active = active
        self._ticks = ticks_ms
        self._on = False
        self._since = 0
        edges = pin.IRQ_FALLING | pin.IRQ_RISING
        try:
            pin.irq(trigger=edges, handler=self._edge, hard=True)
            self.hard = True
        except TypeError:  # a port whose pin IRQs are always scheduled
            pin.irq(trigger=edges, handler=self._edge)
            self.hard = False

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

    def update(self):
        pass  # the IRQ keeps count


class CounterChannel:
    # ESP32: a PCNT unit (machine.Counter) counts the active edges in hardware,
    # so none is lost while Python is busy; the ESP32's pin IRQs are always
    # scheduled, run late after a long C call and are dropped when the queue is
    # full. Its glitch filter is microseconds, not milliseconds: right for S0
    # and comparator outputs, which do not bounce. Read every poll; differences
    # are taken modulo 2^16, so a 16-bit counter wrapping between polls is fine.
    def __init__(self, counter, ticks_ms=time.ticks_ms):
        self.count = 0
        self.at = None
        self.before = None
        self.hard = True
        self._c = counter
        self._v = counter.value()
        self._ticks = ticks_ms
        self._seen = ticks_ms()

    def update(self):
        v = self._c.value()
        d = (v - self._v) & 0xFFFF
        if d:
            now = self._ticks()
            self._v = v
            self.count += d
            # d pulses since the last poll that saw any: their mean spacing
            self.before = time.ticks_add(now, -max(time.ticks_diff(now, self._seen) // d, 1))
            self.at = now
            self._seen = now


class Pulse(Sensor):
    kind = "pulse"

    def __init__(self, imp, exp=None, per_kwh=1000, log=None, temp=None, ticks_ms=time.ticks_ms):
        # imp, exp: PulseChannel or CounterChannel (exp None: import only)
        super().__init__(log, temp)
        if not 1 <= per_kwh <= 100000:
            raise ValueError("pulse per_kwh must be 1..100000")
        self.per_kwh = per_kwh
        self._ticks = ticks_ms
        self.imp = imp
        self.exp = exp
        self._base = (0, 0)
        self._baseline()

    def poll(self):
        self.imp.update()
        if self.exp is not None:
            self.exp.update()

    def _wh(self, ch):
        # integer floor of the whole count: fractions of a Wh carry over exactly
        return ch.count * 1000 // self.per_kwh if ch is not None else 0

    def totals(self):
        self.poll()
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


def make(w, log, temp):
    # sensors.make: an IRQ-counted pin per direction, or on the ESP32 a
    # hardware pulse counter each (PCNT units 0 and 1)
    hw = w.hw
    active = w.get("active", 0)
    pull = hw.Pin.PULL_UP if active == 0 else hw.Pin.PULL_DOWN
    counter = getattr(hw, "Counter", None) if w.get("hw_counter", True) else None

    def channel(key, unit):
        if w.get(key) is None:
            return None
        pin = hw.Pin(w.get(key), hw.Pin.IN, pull)
        if counter is None:
            return PulseChannel(pin, w.get("debounce_ms", 20), active)
        # its glitch filter tops out near 12.8 us
        edge = counter.FALLING if active == 0 else counter.RISING
        return CounterChannel(counter(unit, pin, edge=edge, filter_ns=12000))

    w.need("import_pin")
    return Pulse(channel("import_pin", 0), channel("export_pin", 1), w.get("per_kwh", 1000), log, temp)
