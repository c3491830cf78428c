# Energy sensors behind one interface (sensors.base.Sensor): make() builds the
# configured driver with the board profile's default wiring; any pin can be
# overridden in the sensor's config. Drivers are imported only when chosen.
from sensors.base import ConfigError, Sensor, SensorFault  # noqa: F401

_KEYS = {
    "sim": ("seed", "solar_wp", "tz_offset_s"),
    "pzem": ("uart", "addr", "baud", "timeout_ms", "retries"),
    "pulse": ("import_pin", "export_pin", "per_kwh", "debounce_ms", "active", "hw_counter"),
    "ct": ("adc", "v_adc", "amps_per_volt", "ratio", "burden_ohm", "volts", "pf", "cal",
           "volts_per_volt", "mains_hz", "cycles", "samples", "every_ms", "min_a"),
}


def make(cfg, board, log=None, hw=None):
    # cfg: the config's "sensor" object; hw: the machine module (tests pass fakes)
    kind = cfg.get("type", "sim")
    if kind not in _KEYS:
        raise ConfigError("unknown_type", "sensor type %r (known: %s)" % (kind, ", ".join(sorted(_KEYS))))
    for k in cfg:
        if k != "type" and k not in _KEYS[kind]:
            raise ConfigError("unknown_key", "%s sensor has no setting %r" % (kind, k))
    if kind == "sim":
        from sensors.sim import Sim
        return Sim(cfg, log)
    if hw is None:
        import machine as hw
    wiring = dict(board["wiring"].get(kind) or {})
    wiring.update(cfg)

    def need(key):
        if wiring.get(key) is None:
            raise ConfigError("missing_key", "%s sensor: no %r in the config or in board %s's wiring"
                              % (kind, key, board["id"]))
        return wiring[key]

    try:
        temp = _die_temp(board, hw)
        if kind == "pzem":
            return _pzem(wiring, need, board, hw, log, temp)
        if kind == "pulse":
            return _pulse(wiring, need, hw, log, temp)
        return _ct(wiring, need, board, hw, log, temp)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("bad_value", "%s sensor: %s" % (kind, e))


def _die_temp(board, hw):
    ch = (board["adc"] or {}).get("die_temp")
    if ch is None:
        return None
    from sensors.dietemp import DieTemp
    return DieTemp(hw.ADC(ch), board["adc"]["vref"])


def _pzem(w, need, board, hw, log, temp):
    from sensors.pzem import Pzem
    uid = need("uart")
    pins = board["uarts"].get(str(uid))
    if pins is None:
        raise ConfigError("bad_value", "pzem sensor: board %s has no UART %r" % (board["id"], uid))
    uart = hw.UART(uid, baudrate=w.get("baud", 9600), bits=8, parity=None, stop=1,
                   tx=hw.Pin(pins["tx"]), rx=hw.Pin(pins["rx"]), timeout=0)
    return Pzem(uart, w.get("addr", 1), w.get("timeout_ms", 200), w.get("retries", 2), log, temp)


def _pulse(w, need, hw, log, temp):
    from sensors.pulse import CounterChannel, Pulse, PulseChannel
    active = w.get("active", 0)
    pull = hw.Pin.PULL_UP if active == 0 else hw.Pin.PULL_DOWN
    counter = getattr(hw, "Counter", None) if w.get("hw_counter", True) else None

    def channel(key, unit):
        if w.get(key) is None:
            return None
        pin = hw.Pin(w[key], hw.Pin.IN, pull)
        if counter is None:
            return PulseChannel(pin, w.get("debounce_ms", 20), active)
        # PCNT units 0 and 1; its glitch filter tops out near 12.8 us
        edge = counter.FALLING if active == 0 else counter.RISING
        return CounterChannel(counter(unit, pin, edge=edge, filter_ns=12000))

    need("import_pin")
    return Pulse(channel("import_pin", 0), channel("export_pin", 1), w.get("per_kwh", 1000), log, temp)


def _ct(w, need, board, hw, log, temp):
    from sensors.ct import CtClamp
    adc = board["adc"]
    if adc is None:
        raise ConfigError("bad_value", "ct sensor: board %s has no ADC" % board["id"])

    def channel(key):
        pin = adc["channels"].get(str(w[key]))
        if pin is None:
            raise ConfigError("bad_value", "ct sensor: %s %r is not an ADC channel of %s" % (key, w[key], board["id"]))
        a = hw.ADC(hw.Pin(pin))
        if adc.get("atten_db") == 11:
            a.atten(hw.ADC.ATTN_11DB)  # ESP32: about 0.15-2.45 V usable
        return a

    if "amps_per_volt" in w:
        apv = w["amps_per_volt"]  # voltage-output clamp: SCT-013-030 is 30 A per volt
    else:
        apv = need("ratio") / need("burden_ohm")  # current output: turns ratio over burden
    need("adc")
    vin = channel("v_adc") if "volts_per_volt" in w else None
    return CtClamp(channel("adc"), adc["vref"], adc["bits"], apv, w.get("volts", 230.0), w.get("pf", 1.0),
                   w.get("cal", 1.0), vin, w.get("volts_per_volt"), w.get("mains_hz", 50), w.get("cycles", 10),
                   w.get("samples", 400), w.get("every_ms", 2000), w.get("min_a"), log, temp)
