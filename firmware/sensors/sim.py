# The testbed's simulated household (firmware/simsensor.py) behind the sensor
# interface. Its energy() is passed through untouched: the testbed checks the
# bills against the numbers simsensor.py produces, so they must not change.
from simsensor import SimSensor

from sensors.base import Sensor

KEYS = ("seed", "solar_wp", "tz_offset_s")


class Sim(Sensor):
    kind = "sim"

    def __init__(self, cfg, log=None):
        super().__init__(log)
        self._sim = SimSensor(cfg.get("seed", 1), cfg.get("solar_wp", 0), cfg.get("tz_offset_s", 0))
        self._imp = 0
        self._exp = 0
        self._w = None

    def energy(self, t0, t1):
        imp, exp = self._sim.energy(t0, t1)
        self._imp += imp
        self._exp += exp
        # The simulator has no clock of its own: "instantaneous" power is the
        # mean of the interval just measured.
        self._w = (imp - exp) * 3600 // (t1 - t0) if t1 > t0 else None
        return imp, exp

    def totals(self):
        return self._imp, self._exp

    def checkpoint(self):
        return self._imp, self._exp

    def resume(self, import_wh, export_wh):
        self._imp = import_wh
        self._exp = export_wh

    def power_w(self):
        return self._w
