# Energy sensors behind one interface (sensors.base.Sensor). make() imports
# the configured driver's module and no other: each driver names its config
# keys (KEYS) and builds itself from the board's wiring (its make()), so a
# meter carries the code and names of one driver only (loaded code is RAM).
import sys

from sensors.base import ConfigError, Sensor, SensorFault  # noqa: F401

KINDS = ("sim", "pzem", "pulse", "ct")


def make(cfg, board, log=None, hw=None):
    # cfg: the config's "sensor" object; hw: the machine module (tests pass fakes)
    kind = cfg.get("type", "sim")
    if kind not in KINDS:
        raise ConfigError("unknown_type", "sensor type %r (known: %s)" % (kind, ", ".join(sorted(KINDS))))
    name = "sensors." + kind
    __import__(name)
    drv = sys.modules[name]
    for k in cfg:
        if k != "type" and k not in drv.KEYS:
            raise ConfigError("unknown_key", "%s sensor has no setting %r" % (kind, k))
    if kind == "sim":
        return drv.Sim(cfg, log)
    from sensors.wiring import Wiring
    return Wiring(kind, cfg, board, hw).build(drv.make, log)
