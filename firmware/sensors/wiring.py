# A hardware driver's settings: its config over the board profile's default
# wiring (hardware/wiring.md; any pin can be overridden in the config), the
# machine module, and the board's die-temperature sensor where it has one.
from sensors.base import ConfigError


class Wiring:
    def __init__(self, kind, cfg, board, hw=None):
        if hw is None:
            import machine as hw
        self.kind = kind
        self.board = board
        self.hw = hw
        self.w = dict(board["wiring"].get(kind) or {})
        self.w.update(cfg)

    def get(self, key, default=None):
        return self.w.get(key, default)

    def has(self, key):
        return key in self.w

    def need(self, key):
        if self.w.get(key) is None:
            raise ConfigError("missing_key", "%s sensor: no %r in the config or in board %s's wiring"
                              % (self.kind, key, self.board["id"]))
        return self.w[key]

    def bad(self, detail):
        return ConfigError("bad_value", "%s sensor: %s" % (self.kind, detail))

    def _die_temp(self):
        adc = self.board["adc"] or {}
        if adc.get("die_temp") is None:
            return None
        from sensors.dietemp import DieTemp
        return DieTemp(self.hw.ADC(adc["die_temp"]), adc["vref"])

    def build(self, make, log):
        # make(wiring, log, temp): the driver module's own; a bad value it
        # trips over becomes a ConfigError naming the sensor.
        try:
            return make(self, log, self._die_temp())
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise self.bad(e)
