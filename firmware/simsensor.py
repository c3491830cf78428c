# Simulated household meter for the Unix-port testbed: a seeded load profile
# (base load, fridge cycle, morning and evening peaks, random appliances) and an
# optional rooftop-solar profile. The same seed and times give the same energy.
import math
from micropython import const

_STEP = const(60)  # seconds between power samples


def _mix(a, b):
    # 32-bit integer hash (xorshift-multiply); deterministic on every port
    x = (a * 0x9E3779B1 + b * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x ^= x >> 15
    return x


def _unit(a, b):
    return _mix(a, b) / 4294967296.0


class SimSensor:
    def __init__(self, seed=1, solar_wp=0, tz_offset_s=0):
        self.seed = seed
        self.solar_wp = solar_wp
        self.tz = tz_offset_s
        self._imp = 0.0  # fractional Wh carried between intervals
        self._exp = 0.0

    def _load_w(self, t):
        s = self.seed
        lt = t + self.tz
        hour = (lt % 86400) / 3600.0
        w = 110 + 40 * _unit(s, lt // 86400)
        if (lt // 60 + _mix(s, 7) % 40) % 40 < 14:
            w += 95  # fridge compressor
        if 6.5 <= hour < 8.5:
            w += 350 + 300 * _unit(s, lt // 1800)
        elif 17.5 <= hour < 22.0:
            w += 600 + 700 * _unit(s, lt // 1800)
        elif 8.5 <= hour < 17.5:
            w += 120 * _unit(s, lt // 3600)
        # Appliance events: each 15-minute block may start one.
        blk = lt // 900
        r = _mix(s, blk)
        if 6 <= hour < 23 and r % 100 < 18:
            kind = (r >> 8) % 3
            start = (r >> 12) % 600
            into = lt % 900 - start
            if kind == 0 and 0 <= into < 180:
                w += 2000  # kettle
            elif kind == 1 and 0 <= into < 300:
                w += 1800  # oven or hob element
            elif kind == 2 and 0 <= into:
                w += 450  # washing machine
        return w

    def _solar_w(self, t):
        if not self.solar_wp:
            return 0.0
        lt = t + self.tz
        hour = (lt % 86400) / 3600.0
        if not 6.0 <= hour < 18.0:
            return 0.0
        cloud = 0.35 + 0.65 * _unit(self.seed + 1, lt // 1800)
        return self.solar_wp * math.sin(math.pi * (hour - 6.0) / 12.0) * cloud

    def energy(self, t0, t1):
        # Import and export watt-hours in [t0, t1), netted per sample as a
        # bidirectional meter does; fractions carry into the next interval.
        imp = self._imp
        exp = self._exp
        t = t0
        while t < t1:
            step = min(_STEP, t1 - t)
            net = self._load_w(t) - self._solar_w(t)
            if net >= 0:
                imp += net * step / 3600.0
            else:
                exp -= net * step / 3600.0
            t += step
        wi = int(imp)
        we = int(exp)
        self._imp = imp - wi
        self._exp = exp - we
        return wi, we
