# CT clamp (SCT-013-000 with a burden resistor, or a voltage-output -030) on an
# ADC pin biased at mid-rail. Every `every_ms` the driver samples a whole number
# of mains cycles, takes the RMS current (the bias is the samples' own mean),
# and integrates power over time between samples. With an AC-AC adapter on a
# second ADC pin it measures real power and its sign; without, it can only
# estimate power as nominal volts x amps x an assumed power factor, import only.
import array
import math
import time

from sensors.base import Sensor

_MJ_PER_WH = 3600000  # W x ms = mJ

KEYS = ("adc", "v_adc", "amps_per_volt", "ratio", "burden_ohm", "volts", "pf", "cal",
        "volts_per_volt", "mains_hz", "cycles", "samples", "every_ms", "min_a")


class CtClamp(Sensor):
    kind = "ct"
    max_w = 0  # our own counters: they never roll over

    def __init__(self, adc, vref, bits, amps_per_volt, volts=230.0, pf=1.0, cal=1.0,
                 v_adc=None, volts_per_volt=None, mains_hz=50, cycles=10, samples=400,
                 every_ms=2000, min_a=None, log=None, temp=None, ticks_ms=time.ticks_ms,
                 ticks_us=time.ticks_us):
        super().__init__(log, temp)
        if amps_per_volt <= 0 or not 0 < pf <= 1 or cal <= 0 or not 16 <= samples <= 4000:
            raise ValueError("ct: need amps_per_volt > 0, 0 < pf <= 1, cal > 0, 16 <= samples <= 4000")
        if (v_adc is None) != (volts_per_volt is None):
            raise ValueError("ct: a voltage input needs both v_adc and volts_per_volt")
        self._adc = adc
        self._vadc = v_adc
        self._shift = 16 - bits  # read_u16 scales the native reading up to 16 bits
        lsb = vref / (1 << bits)
        self._a_per_count = lsb * amps_per_volt * cal
        self._v_per_count = lsb * volts_per_volt if v_adc is not None else 0
        self._volts = volts
        self._pf = pf
        # Below this the RMS is the ADC's own noise: read it as no current.
        self.min_a = min_a if min_a is not None else 3 * self._a_per_count
        self._step_us = int(cycles * 1000000 / mains_hz) // samples
        self._i = array.array("H", bytes(2 * samples))
        self._v = array.array("H", bytes(2 * samples)) if v_adc is not None else None
        self._ticks = ticks_ms
        self._us = ticks_us
        self._every = every_ms
        self._at = None  # ticks of the last sample window
        self._w = 0.0  # its power
        self.amps = self.vrms = None
        self.uneven = 0  # windows used although not evenly paced
        self._mj = [0, 0]  # energy since the last whole Wh, per direction
        self._wh = [0, 0]
        self._base = (0, 0)
        self._baseline()

    def _sample(self):
        # Paced by the microsecond clock so the window spans whole mains cycles:
        # an RMS over a fraction of a cycle is biased. Returns False when a
        # sample came more than one step late (an interrupt, Wi-Fi, a busy
        # host): the samples after the gap bunch up and the RMS is biased.
        ib, vb, adc, vadc, sh, step, us = self._i, self._v, self._adc, self._vadc, self._shift, self._step_us, self._us
        t = us()
        even = True
        for k in range(len(ib)):
            while time.ticks_diff(us(), t) < 0:
                pass
            if time.ticks_diff(us(), t) > step:
                even = False
            ib[k] = adc.read_u16() >> sh
            if vb is not None:
                vb[k] = vadc.read_u16() >> sh
            t = time.ticks_add(t, step)
        return even

    def measure(self):
        # One window (retaken, up to three times, if it was not evenly paced):
        # RMS amps (and volts), and the power it implies.
        for _ in range(3):
            if self._sample():
                break
        else:
            self.uneven += 1
        ib, vb = self._i, self._v
        n = len(ib)
        mi = sum(ib) / n
        si = 0.0
        for x in ib:
            si += (x - mi) * (x - mi)
        amps = math.sqrt(si / n) * self._a_per_count
        if amps < self.min_a:
            amps = 0.0
        self.amps = amps
        if vb is None:
            self.vrms = None
            self._w = self._volts * amps * self._pf
            return self._w
        mv = sum(vb) / n
        sv = sp = 0.0
        for k in range(n):
            dv = vb[k] - mv
            sv += dv * dv
            sp += dv * (ib[k] - mi)
        self.vrms = math.sqrt(sv / n) * self._v_per_count
        self._w = sp / n * self._v_per_count * self._a_per_count if amps else 0.0
        return self._w

    def poll(self):
        now = self._ticks()
        if self._at is not None and time.ticks_diff(now, self._at) < self._every:
            return
        prev = self._w
        w = self.measure()
        if self._at is not None:
            # Trapezoid between windows: a load that switched in between counts half.
            mj = int((prev + w) / 2 * time.ticks_diff(now, self._at))
            d = 0 if mj >= 0 else 1
            self._mj[d] += abs(mj)
            self._wh[d] += self._mj[d] // _MJ_PER_WH
            self._mj[d] %= _MJ_PER_WH
        self._at = now

    def totals(self):
        return self._base[0] + self._wh[0], self._base[1] + self._wh[1]

    def resume(self, import_wh, export_wh):
        # as for pulses: energy integrated since boot comes after the checkpoint
        self._base = (import_wh, export_wh)
        super().resume(import_wh, export_wh)

    def energy(self, t0, t1):
        self.poll()
        return super().energy(t0, t1)

    def power_w(self):
        return self._w if self._at is not None else None


def make(w, log, temp):
    # sensors.make: the clamp on an ADC channel of the board, and optionally an
    # AC-AC adapter on another
    hw, board = w.hw, w.board
    adc = board["adc"]
    if adc is None:
        raise w.bad("board %s has no ADC" % board["id"])

    def channel(key):
        pin = adc["channels"].get(str(w.get(key)))
        if pin is None:
            raise w.bad("%s %r is not an ADC channel of %s" % (key, w.get(key), board["id"]))
        a = hw.ADC(hw.Pin(pin))
        if adc.get("atten_db") == 11:
            a.atten(hw.ADC.ATTN_11DB)  # ESP32: about 0.15-2.45 V usable
        return a

    if w.has("amps_per_volt"):
        apv = w.get("amps_per_volt")  # voltage-output clamp: SCT-013-030 is 30 A per volt
    else:
        apv = w.need("ratio") / w.need("burden_ohm")  # current output: turns ratio over burden
    w.need("adc")
    vin = channel("v_adc") if w.has("volts_per_volt") else None
    return CtClamp(channel("adc"), adc["vref"], adc["bits"], apv, w.get("volts", 230.0), w.get("pf", 1.0),
                   w.get("cal", 1.0), vin, w.get("volts_per_volt"), w.get("mains_hz", 50), w.get("cycles", 10),
                   w.get("samples", 400), w.get("every_ms", 2000), w.get("min_a"), log, temp)
