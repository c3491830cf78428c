# Board profiles: pins, UARTs, ADC channels, LED and watchdog limit of each
# target, kept as data in hardware/boards/*.json (copied into the bundle's
# profiles/ folder: a boards/ folder would shadow this module). Checked on
# load, so a wrong profile stops the meter at boot with a reason instead of
# driving the wrong pin.
import json
import sys

_KEYS = ("id", "name", "platform", "wifi", "fs_bytes", "gpio", "led", "watchdog",
         "adc", "uarts", "wiring", "notes")
_WIRING = {"pzem": ("uart",), "pulse": ("import_pin", "export_pin"), "ct": ("adc", "v_adc")}


class BoardError(ValueError):
    # reason: unknown_board, bad_json, missing_key, unknown_key, bad_type,
    # bad_value, pin_reserved, pin_conflict, wrong_platform
    def __init__(self, reason, detail):
        super().__init__("board profile: %s: %s" % (reason, detail))
        self.reason = reason
        self.detail = detail


def _dirs():
    # Bundle: profiles/ beside this module. Source tree: hardware/boards/
    # beside firmware/. Then every import path (a board's root is "").
    here = __file__.rsplit("/", 1)[0] if "/" in __file__ else ""
    pre = here + "/" if here else ""
    yield pre + "profiles"
    yield pre + "../hardware/boards"
    for p in sys.path:
        yield (p + "/profiles") if p else "profiles"


def load(name):
    if not isinstance(name, str) or not name or len(name) > 32 or \
            [c for c in name if not ("a" <= c <= "z" or "0" <= c <= "9" or c == "-")]:
        raise BoardError("unknown_board", "board name must be [a-z0-9-]{1,32}, got %r" % (name,))
    for d in _dirs():
        try:
            f = open(d + "/" + name + ".json")
        except OSError:
            continue
        with f:
            try:
                doc = json.load(f)
            except ValueError as e:
                raise BoardError("bad_json", "%s/%s.json: %s" % (d, name, e))
        return validate(doc, name)
    raise BoardError("unknown_board", "no profile %s.json in profiles/" % name)


def default_name():
    # What a config without "board" runs on.
    p = sys.platform
    if p == "esp32":
        return "esp32-devkitc"
    if p == "rp2":
        try:
            import network  # noqa: F401  (only the Pico W firmware has it)
            return "pico-w"
        except ImportError:
            return "pico"
    return "unix"


def select(cfg):
    b = load(cfg.get("board") or default_name())
    if b["platform"] != sys.platform and not (b["platform"] == "linux" and sys.platform == "darwin"):
        raise BoardError("wrong_platform", "profile %s is for %s, this firmware runs on %s"
                         % (b["id"], b["platform"], sys.platform))
    return b


def _at(where, key):
    # "gpio" and "max" -> "gpio.max". Prefixes are passed without their dot:
    # short strings in code are interned in RAM for good, and "gpio" already is.
    return where + "." + key if where else key


def _need(doc, key, kinds, where):
    if key not in doc:
        raise BoardError("missing_key", _at(where, key))
    v = doc[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise BoardError("bad_type", "%s: %r" % (_at(where, key), v))
    return v


def _pin(v, gpio, where):
    if isinstance(v, str) and v:
        return v  # a named pin (Pin("LED") on a Pico W)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= gpio["max"]:
        raise BoardError("bad_value", "%s: pin %r not in 0..%d" % (where, v, gpio["max"]))
    if v in gpio["reserved"]:
        raise BoardError("pin_reserved", "%s: GPIO %d is reserved on this board" % (where, v))
    return v


def validate(doc, name=None):
    if not isinstance(doc, dict):
        raise BoardError("bad_type", "a profile is a JSON object")
    for k in doc:
        if k not in _KEYS:
            raise BoardError("unknown_key", k)
    bid = _need(doc, "id", str, "")
    if name is not None and bid != name:
        raise BoardError("bad_value", "id %r in the file for board %r" % (bid, name))
    _need(doc, "name", str, "")
    _need(doc, "platform", str, "")
    _need(doc, "wifi", bool, "")
    fs = _need(doc, "fs_bytes", (int, type(None)), "")
    if fs is not None and fs <= 0:
        raise BoardError("bad_value", "fs_bytes: %r" % fs)
    gpio = _need(doc, "gpio", dict, "")
    _need(gpio, "max", int, "gpio")
    for p in _need(gpio, "reserved", list, "gpio"):
        if isinstance(p, bool) or not isinstance(p, int):
            raise BoardError("bad_type", "gpio.reserved: %r" % (p,))
    used = {}  # pin -> what uses it

    def claim(pin, what):
        if pin in used:
            raise BoardError("pin_conflict", "pin %r is both %s and %s" % (pin, used[pin], what))
        used[pin] = what

    led = _need(doc, "led", (dict, type(None)), "")
    if led is not None:
        claim(_pin(_need(led, "pin", (int, str), "led"), gpio, _at("led", "pin")), "led")
    wd = _need(doc, "watchdog", (dict, type(None)), "")
    if wd is not None:
        mx = _need(wd, "max_ms", int, "watchdog")
        dflt = _need(wd, "default_ms", int, "watchdog")
        if mx < 1000 or not 1000 <= dflt <= mx:
            raise BoardError("bad_value", "watchdog: need 1000 <= default_ms (%d) <= max_ms (%d)" % (dflt, mx))
    adc = _need(doc, "adc", (dict, type(None)), "")
    if adc is not None:
        bits = _need(adc, "bits", int, "adc")
        if not 8 <= bits <= 16:
            raise BoardError("bad_value", "adc.bits: %d" % bits)
        vref = _need(adc, "vref", (int, float), "adc")
        if not 0.5 <= vref <= 5:
            raise BoardError("bad_value", "adc.vref: %r" % vref)
        for ch, p in _need(adc, "channels", dict, "adc").items():
            _pin(p, gpio, "adc.channels." + ch)
        _need(adc, "die_temp", (int, type(None)), "adc")
    uarts = _need(doc, "uarts", dict, "")
    for uid, u in uarts.items():
        if not isinstance(u, dict):
            raise BoardError("bad_type", "uarts.%s" % uid)
        for end in ("tx", "rx"):
            where = "uarts.%s" % uid
            claim(_pin(_need(u, end, int, where), gpio, _at(where, end)),
                  "UART%s %s" % (uid, end))
    wiring = _need(doc, "wiring", dict, "")
    for kind, w in wiring.items():
        if kind not in _WIRING:
            raise BoardError("unknown_key", _at("wiring", kind))
        if not isinstance(w, dict):
            raise BoardError("bad_type", _at("wiring", kind))
        for k, v in w.items():
            where = _at(_at("wiring", kind), k)
            if k not in _WIRING[kind]:
                raise BoardError("unknown_key", where)
            if k == "uart":
                if str(v) not in uarts:
                    raise BoardError("bad_value", "%s: UART %r is not in uarts" % (where, v))
            elif k.endswith("adc"):
                if adc is None or str(v) not in adc["channels"]:
                    raise BoardError("bad_value", "%s: ADC channel %r is not in adc.channels" % (where, v))
                claim(adc["channels"][str(v)], where)
            else:
                claim(_pin(v, gpio, where), where)
    return doc
