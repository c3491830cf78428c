# Under MicroPython: drive the sensor drivers, board profiles and watchdog with
# the fake peripherals of fakehw.py. argv[1]: a JSON job from tests/test_sensors.py
# (frames and pulse timelines built in CPython). Prints one JSON object.
import sys
import json
import binascii
import time
import micropython

import fakehw
import boards
import sensors
from sensors.base import SensorFault
from sensors.pzem import Pzem, crc16, request
from sensors.pulse import CounterChannel, Pulse, PulseChannel
from sensors.ct import CtClamp
from watchdog import Watchdog

with open(sys.argv[1]) as f:
    job = json.load(f)
out = {}


class Log:
    def __init__(self):
        self.lines = []

    def __call__(self, ev, **kw):
        kw["ev"] = ev
        self.lines.append(kw)


def unhex(h):
    return binascii.unhexlify(h) if h is not None else None


def fault_of(fn):
    try:
        fn()
    except SensorFault as e:
        return e.reason
    except ValueError as e:
        return "%s:%s" % (type(e).__name__, getattr(e, "reason", ""))
    return None


def pzem_with(answers, **kw):
    u = fakehw.UART(1)
    u.answers = [unhex(a) for a in answers]
    log = Log()
    return Pzem(u, log=log, **kw), u, log


# --- Modbus frames ---
out["crc_check"] = crc16(b"123456789")
out["request"] = [binascii.hexlify(request(a)).decode() for a in job["addrs"]]
p, u, log = pzem_with([job["frames"]["good"]])
out["pzem_good"] = {
    "writes": [binascii.hexlify(w).decode() for w in u.writes],
    "fields": [p.deci_volts, p.milli_amps, p.deci_watts, p.energy_wh, p.deci_hz, p.centi_pf, p.alarm],
    "fault": p.fault,
}
u.answers = [unhex(job["frames"]["e1000"])]
out["pzem_good"]["power_w"] = p.power_w()  # the read just made is fresh: no new request
out["pzem_good"]["writes_after_power"] = len(u.writes)
u.answers = [unhex(job["frames"]["alarm"])]
p.read()
out["pzem_alarm"] = p.alarm

# One bad CRC: the retry reads the good frame, no fault.
p, u, log = pzem_with([job["frames"]["e1000"], job["frames"]["bad_crc"], job["frames"]["e1250"]])
out["crc_single"] = {"energy": p.energy(0, 900), "writes": len(u.writes), "fault": p.fault, "log": log.lines}

# Three bad CRCs in a row: a typed fault, no energy; good frames again: recovery,
# and the missed interval's energy arrives with the next one.
p, u, log = pzem_with([job["frames"]["e1000"]] + [job["frames"]["bad_crc"]] * 3)
e1 = p.energy(0, 900)
r1 = p.fault.reason if p.fault else None
u.answers = [unhex(job["frames"]["e1500"])]
e2 = p.energy(900, 1800)
out["crc_repeated"] = {"energy": [e1, e2], "fault_then": r1, "fault_now": p.fault,
                       "writes": len(u.writes), "log": log.lines}

# Other bad answers
for name in ("exception", "wrong_addr", "bad_count", "short"):
    p, u, log = pzem_with([job["frames"]["e1000"]] + [job["frames"][name]] * 3, timeout_ms=50)
    out["bad_" + name] = fault_of(p.read)

# Silence: three timed-out attempts, bounded in time.
p, u, log = pzem_with([None] * 6, timeout_ms=100)
w0 = len(u.writes)
t = time.ticks_ms()
out["timeout"] = {"fault": fault_of(p.read), "ms": time.ticks_diff(time.ticks_ms(), t), "writes": len(u.writes) - w0}
# A late answer left in the buffer is flushed before the next request.
p, u, log = pzem_with([job["frames"]["e1000"], job["frames"]["e1250"]])
u.rx = unhex(job["frames"]["e1500"])
p.read()
out["stale_flushed"] = p.energy_wh

# --- counter roll-over and reset ---
seq = job["counter"]
p, u, log = pzem_with([job["frames"]["e%d" % seq[0]]])
deltas = []
t = 0
for e in seq[1:]:
    u.answers = [unhex(job["frames"]["e%d" % e])]
    deltas.append(p.energy(t, t + 900)[0])
    t += 900
out["counter"] = {"deltas": deltas, "log": [x["ev"] for x in log.lines]}
p, u, log = pzem_with([job["frames"]["e1000"]] * 2)
p.resume(900, 0)  # persisted before a reboot: the first interval counts from there
out["resume_pzem"] = [p.energy(0, 900), p.checkpoint()]

# --- pulses ---
def locked(fn, arg):
    # Any allocation inside fn raises MemoryError (caught by the caller).
    micropython.heap_lock()
    try:
        fn(arg)
    finally:
        micropython.heap_unlock()


def run_pulses(timeline, min_ms, lock):
    clock = fakehw.Clock()
    pin = fakehw.Pin(14, level=1)
    s = Pulse(PulseChannel(pin, min_ms, 0, clock.ticks), None, per_kwh=1000, ticks_ms=clock.ticks)
    alloc = None
    for t, level in timeline:
        clock.ms = t
        if not lock:
            pin.drive(level)
            continue
        try:
            locked(pin.drive, level)
        except MemoryError:
            alloc = t
    return s.imp.count, alloc, pin


def allocating_edge(pin):
    pin.seen = [pin.level]  # what the handler must never do


# The check itself can fail: an allocating handler is caught.
probe = fakehw.Pin(3)
probe.irq(handler=allocating_edge)
try:
    locked(probe.drive, 0)
    out["heap_lock_catches"] = False
except MemoryError:
    out["heap_lock_catches"] = True


n, alloc, pin = run_pulses(job["pulses"]["timeline"], job["pulses"]["min_ms"], True)
out["pulse_debounced"] = {"count": n, "alloc_at": alloc, "hard": pin.hard,
                          "trigger": pin.trigger == fakehw.Pin.IRQ_FALLING | fakehw.Pin.IRQ_RISING}
out["pulse_raw"] = run_pulses(job["pulses"]["timeline"], 0, False)[0]

clock = fakehw.Clock()


def two_channels(ip, ep):
    return Pulse(PulseChannel(ip, 20, 0, clock.ticks), PulseChannel(ep, 20, 0, clock.ticks), per_kwh=800,
                 ticks_ms=clock.ticks)


ip, ep = fakehw.Pin(14), fakehw.Pin(15)
s = two_channels(ip, ep)


def pulses(pin, k, gap_ms):
    for _ in range(k):
        pin.drive(0)
        clock.ms += 40
        pin.drive(1)
        clock.ms += gap_ms - 40


pulses(ip, 1000, 4500)  # 800/kWh, 4.5 s apart: 1000 W
imp_w = s.power_w()
e1 = s.energy(0, 900)
pulses(ep, 3, 2250)
exp_w = s.power_w()
e2 = s.energy(900, 1800)
pulses(ep, 1, 2250)
e3 = s.energy(1800, 2700)
clock.ms += 9000  # no pulse for 9 s: the export rate can only be lower
out["pulse_channels"] = {"energy": [e1, e2, e3], "totals": s.totals(), "imp_w": imp_w, "exp_w": exp_w,
                         "late_w": s.power_w()}
# After a reboot: two pulses arrive before the meter hands over the checkpoint
# it persisted; they are energy after the checkpoint, like the eight after.
ip, ep = fakehw.Pin(14), fakehw.Pin(15)
s = two_channels(ip, ep)
pulses(ip, 2, 4500)
s.resume(5000, 7)
pulses(ip, 8, 4500)
e = s.energy(2700, 3600)
out["pulse_resume"] = {"totals": s.totals(), "energy": e, "checkpoint": s.checkpoint()}

# A port without hard IRQs (ESP32 without machine.Counter): scheduled handlers,
# same counting.
sp = fakehw.SoftPin(14)
ch = PulseChannel(sp, 20, 0, clock.ticks)
for _ in range(5):
    sp.drive(0)
    clock.ms += 40
    sp.drive(1)
    clock.ms += 200
out["pulse_soft"] = {"hard": ch.hard, "count": ch.count}

# ESP32 hardware counters: 1000 pulses across the 16-bit wrap, read by poll().
cnt_i = fakehw.PulseCounter(0, fakehw.Pin(25))
cnt_e = fakehw.PulseCounter(1, fakehw.Pin(26))
s = Pulse(CounterChannel(cnt_i, clock.ticks), CounterChannel(cnt_e, clock.ticks), per_kwh=800, ticks_ms=clock.ticks)
clock.ms += 4500000
cnt_i.pulses(1000)  # 1000 pulses in 4500 s: 1000 W at 800/kWh
s.poll()
w = s.power_w()
cnt_e.pulses(3)
out["pulse_counter"] = {"energy": s.energy(0, 900), "w": w, "wrapped": cnt_i.value() < 0,
                        "totals": s.totals()}

# --- CT clamp ---
ct = job["ct"]


def clamp(signal, noise, vsignal=None, us=None, **kw):
    us = us or fakehw.UsClock()
    adc = fakehw.ADC(26, signal, noise, seed=7, clock=us)
    vadc = fakehw.ADC(27, vsignal, noise, seed=11, clock=us) if vsignal else None
    return CtClamp(adc, 3.3, 12, ct["ratio"] / ct["burden"], v_adc=vadc,
                   volts_per_volt=ct["vpv"] if vsignal else None, ticks_us=us.ticks, **kw)


def amps_signal(amps, phase=0.0):
    # secondary current through the burden, around the mid-rail bias
    return fakehw.sine(1.65, amps * 1.41421356 / ct["ratio"] * ct["burden"], phase=phase)


res = {}
for a in ct["amps"]:
    c = clamp(amps_signal(a), ct["noise"])
    res[str(a)] = c.measure()
    res["A" + str(a)] = c.amps
out["ct_rms"] = res
vsig = fakehw.sine(1.65, 230 * 1.41421356 / ct["vpv"])
c = clamp(amps_signal(10, -0.6435), ct["noise"], vsig)  # current lags by acos(0.8)
out["ct_real"] = {"w": c.measure(), "v": c.vrms, "a": c.amps, "uneven": c.uneven}
c = clamp(amps_signal(10, 3.14159265), ct["noise"], vsig)  # current against the voltage: exporting
out["ct_export_w"] = c.measure()
# A 5 ms stall (an interrupt) inside the first window: that window is retaken.
# Stalls in every window: the reading is kept but counted as uneven.
us = fakehw.UsClock(stall_at={300: 5000})
c = clamp(amps_signal(10), ct["noise"], us=us)
a = c.measure()
out["ct_stall"] = {"a": a, "uneven": c.uneven, "reads": c._adc.reads}
us = fakehw.UsClock(stall_at={k: 5000 for k in range(300, 400000, 1000)})
c = clamp(amps_signal(10), ct["noise"], us=us)
c.measure()
out["ct_stalls"] = {"uneven": c.uneven, "reads": c._adc.reads}
# Integration: 15 windows one minute apart at 10 A x 230 V, power factor 1.
clock = fakehw.Clock()
c = clamp(amps_signal(10), ct["noise"], every_ms=60000, ticks_ms=clock.ticks)
for _ in range(15):
    c.poll()
    clock.ms += 60000
out["ct_energy"] = {"energy": c.energy(0, 900), "totals": c.totals()}
c = clamp(amps_signal(10, 3.14159265), ct["noise"], vsig, every_ms=60000, ticks_ms=clock.ticks)
for _ in range(16):
    c.poll()
    clock.ms += 60000
out["ct_export_energy"] = c.energy(0, 900)

# --- make(): board wiring through to the peripherals ---
pico = boards.load("pico")
fakehw.UART.made[:] = []
fakehw.Pin.made[:] = []
fakehw.ADC.made[:] = []
s = sensors.make({"type": "pzem"}, pico, hw=fakehw)
uart = fakehw.UART.made[-1]
out["make_pzem"] = {"kind": s.kind, "uart": uart.id, "tx": uart.kw["tx"].id, "rx": uart.kw["rx"].id,
                    "baud": uart.kw["baudrate"], "fault": s.fault.reason if s.fault else None,
                    "temp_src": fakehw.ADC.made[0].src}
s = sensors.make({"type": "pulse", "per_kwh": 500}, pico, hw=fakehw)
out["make_pulse"] = {"pins": [(p.id, p.pull, p.handler is not None) for p in fakehw.Pin.made[-2:]],
                     "per_kwh": s.per_kwh}
s = sensors.make({"type": "ct", "ratio": 2000, "burden_ohm": 33, "volts_per_volt": 460}, pico, hw=fakehw)
out["make_ct"] = {"adc": [a.src.id for a in fakehw.ADC.made[-2:]], "min_a": s.min_a}
esp = boards.load("esp32-devkitc")
s = sensors.make({"type": "ct", "amps_per_volt": 30}, esp, hw=fakehw)
out["make_ct_esp32"] = {"adc": fakehw.ADC.made[-1].src.id, "atten": fakehw.ADC.made[-1].atten_set,
                        "temp": s.temp_c()}
s = sensors.make({"type": "pulse", "import_pin": 16, "export_pin": None}, pico, hw=fakehw)
out["make_override"] = [fakehw.Pin.made[-1].id, s.exp is None]
s = sensors.make({"type": "pulse"}, esp, hw=fakehw.Esp32)
out["make_pulse_esp32"] = {"channels": [type(s.imp).__name__, type(s.exp).__name__],
                           "counters": [(c.id, c.src.id, c.edge, c.filter_ns, c.src.pull) for c in fakehw.PulseCounter.made[-2:]]}
s = sensors.make({"type": "pulse", "hw_counter": False}, esp, hw=fakehw.Esp32)
out["make_pulse_esp32_irq"] = [type(s.imp).__name__, s.imp.hard]
unix = boards.load("unix")
errs = {}
for name, cfg, board in (("unknown_type", {"type": "hall"}, pico), ("unknown_key", {"type": "pzem", "pin": 3}, pico),
                         ("no_wiring", {"type": "pulse"}, unix), ("no_uart", {"type": "pzem", "uart": 0 + 7}, pico),
                         ("bad_per_kwh", {"type": "pulse", "per_kwh": 0}, pico), ("no_adc", {"type": "ct", "amps_per_volt": 30}, unix),
                         ("no_burden", {"type": "ct", "ratio": 2000}, pico)):
    try:
        sensors.make(cfg, board, hw=fakehw)
        errs[name] = None
    except sensors.ConfigError as e:
        errs[name] = [e.reason, str(e)]
out["make_errors"] = errs
t = sensors.make({"type": "pzem"}, pico, hw=fakehw).temp_c()
out["die_temp"] = t

# --- the simulated source: same numbers as simsensor.py ---
from simsensor import SimSensor
sim = sensors.make({"seed": 3, "solar_wp": 4000}, unix)
ref = SimSensor(3, 4000, 0)
same = True
t = 1700000100
for _ in range(96):
    same = same and sim.energy(t, t + 900) == ref.energy(t, t + 900)
    t += 900
out["sim"] = {"same": same, "totals": sim.totals(), "kind": sim.kind, "temp": sim.temp_c()}

# --- board profiles ---
out["boards"] = {n: boards.load(n)["watchdog"] for n in ("unix", "pico", "pico-w", "esp32-devkitc")}
errs = {}
for name, doc in job["bad_profiles"].items():
    try:
        boards.validate(doc, doc.get("id"))
        errs[name] = None
    except boards.BoardError as e:
        errs[name] = [e.reason, str(e)]
for name in ("../etc", "nope", ""):
    try:
        boards.load(name)
    except boards.BoardError as e:
        errs["load " + name] = [e.reason, str(e)]
try:
    boards.select({"board": "pico"})
except boards.BoardError as e:
    errs["select pico"] = [e.reason, str(e)]
out["board_errors"] = errs
out["default_board"] = boards.select({})["id"]

# --- watchdog ---
wd = {}
for bname, asked in (("pico", 30000), ("pico", None), ("esp32-devkitc", 30000), ("unix", 30000), ("pico", 0)):
    log = Log()
    fakehw.WDT.made[:] = []
    w = Watchdog(boards.load(bname), asked, log, fakehw.WDT)
    armed_before = len(fakehw.WDT.made)
    for _ in range(3):
        w.feed()
    wd["%s %s" % (bname, asked)] = {"timeout": w.timeout_ms, "armed_before_feed": armed_before,
                                    "wdts": [(x.timeout, x.feeds) for x in fakehw.WDT.made], "log": log.lines}
log = Log()
w = Watchdog(pico, 5000, log)  # no fake: the Unix port has no machine.WDT
w.feed()
wd["pico on unix"] = {"timeout": w.timeout_ms, "log": log.lines}
try:
    Watchdog(pico, 500)
except ValueError as e:
    wd["too short"] = str(e)
out["watchdog"] = wd


def plain(x):
    # SensorFault objects are not JSON: name them by reason
    if isinstance(x, SensorFault):
        return x.reason
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


print(json.dumps(plain(out)))
