"""Sensor drivers, board profiles and the watchdog, run under the real MicroPython
Unix port (from source and from the mpy-cross bundle) against the fake peripherals
of tests/firmware/fakehw.py. Frames and pulse timelines are built here, in CPython,
independently of the firmware."""

import copy
import json
import random
import re
import struct

import pytest

from gridledger.firmware_build import BOARDS, FIRMWARE_SRC, ROOT
from gridledger.testbed import meter_process, write_meter_config

from conftest import MP_SCRIPTS, MicroPython
from helpers import N

PROFILES = {p.stem: json.loads(p.read_text()) for p in BOARDS.glob("*.json")}


def crc16_modbus(data: bytes) -> int:
    """CRC-16/MODBUS (poly 0x8005 reflected, init 0xFFFF), the catalogue's definition."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<H", crc16_modbus(body))


# PZEM-004T v3.0 answer to "read 10 input registers": volts 0.1 V; amps 1 mA and
# watts 0.1 W and energy 1 Wh as (low, high) 16-bit words; 0.1 Hz; pf 0.01; alarm.
GOOD = dict(volts=2301, milli_amps=81234, deci_watts=186789, wh=123456, deci_hz=500, centi_pf=92, alarm=0)


def answer(addr=1, count=20, **kw) -> str:
    f = dict(GOOD, **kw)
    regs = [f["volts"], f["milli_amps"] & 0xFFFF, f["milli_amps"] >> 16, f["deci_watts"] & 0xFFFF,
            f["deci_watts"] >> 16, f["wh"] & 0xFFFF, f["wh"] >> 16, f["deci_hz"], f["centi_pf"], f["alarm"]]
    return with_crc(bytes([addr, 0x04, count]) + struct.pack(">10H", *regs)).hex()


def pulse_timeline(n: int, seed: int) -> list:
    """n real pulses (30-80 ms wide) with contact bounce on both edges, and 3 ms
    spikes between them that are not pulses; (ms, level) edges, active low."""
    rnd = random.Random(seed)
    t, edges = 100, []
    for _ in range(n):
        burst = rnd.randint(0, 2)  # extra bounce pairs on the press
        for k in range(burst):
            edges += [(t + 2 * k, 0), (t + 2 * k + 1, 1)]
        start = t + 2 * burst
        edges.append((start, 0))
        end = start + rnd.randint(30, 80)
        edges += [(end, 1), (end + 1, 0), (end + 2, 1)]  # bounce on release
        t = end + rnd.randint(60, 400)
        if rnd.random() < 0.3:
            edges += [(t - 30, 0), (t - 27, 1)]  # a 3 ms spike: interference, not a pulse
    return edges


COUNTER = [9999900, 9999990, 40, 5000000, 20]


def bad_profiles() -> dict:
    def mutate(fn):
        doc = copy.deepcopy(PROFILES["pico"])
        fn(doc)
        return doc

    def setw(kind, key, v):
        return lambda d: d["wiring"][kind].__setitem__(key, v)

    return {
        "missing_key": mutate(lambda d: d.pop("watchdog")),
        "unknown_key": mutate(lambda d: d.__setitem__("ledd", 1)),
        "bad_type": mutate(lambda d: d.__setitem__("wifi", "yes")),
        "pin_conflict": mutate(setw("pulse", "import_pin", 4)),  # UART1 TX
        "pin_reserved": mutate(setw("pulse", "export_pin", 23)),
        "pin_range": mutate(setw("pulse", "import_pin", 40)),
        "pin_bool": mutate(setw("pulse", "import_pin", True)),
        "wiring_uart": mutate(setw("pzem", "uart", 3)),
        "wiring_adc": mutate(setw("ct", "adc", 5)),
        "wiring_kind": mutate(lambda d: d["wiring"].__setitem__("hall", {})),
        "watchdog": mutate(lambda d: d["watchdog"].__setitem__("default_ms", 9000)),
        "adc_bits": mutate(lambda d: d["adc"].__setitem__("bits", 24)),
    }


def job() -> dict:
    frames = {
        "good": answer(),
        "alarm": answer(alarm=0xFFFF),
        "bad_crc": answer()[:-4] + "0000",
        "exception": with_crc(bytes([1, 0x84, 0x02])).hex(),
        "wrong_addr": answer(addr=2),
        "bad_count": with_crc(bytes([1, 0x04, 18]) + bytes(20)).hex(),
        "short": answer()[:20],
    }
    for wh in [1000, 1250, 1500, *COUNTER]:
        frames[f"e{wh}"] = answer(wh=wh)
    return {
        "addrs": [1, 2, 0xF7],
        "frames": frames,
        "counter": COUNTER,
        "pulses": {"timeline": pulse_timeline(200, 5), "min_ms": 20},
        "ct": {"ratio": 2000, "burden": 22, "vpv": 460, "noise": 1.5, "amps": [10, 1, 0]},
        "bad_profiles": bad_profiles(),
    }


@pytest.fixture(scope="module", params=["source", "bundle"])
def run(request, tmp_path_factory):
    """Everything mp_sensors.py measured, from the firmware's source or its mpy-cross bundle."""
    if request.param == "source":
        mp = MicroPython([FIRMWARE_SRC])
    else:
        mp = MicroPython([request.getfixturevalue("firmware_bundle")])
    path = tmp_path_factory.mktemp("sensors") / "job.json"
    path.write_text(json.dumps(job()))
    return mp.run_json(MP_SCRIPTS / "mp_sensors.py", path, heap="512k")


def test_request_frame_is_the_datasheet_one(run):
    """The read request is byte for byte the datasheet's 01 04 00 00 00 0A 70 0D; other addresses get their own CRC."""
    assert run["request"][0] == "01040000000a700d"
    assert run["request"] == [with_crc(bytes([a, 4, 0, 0, 0, 10])).hex() for a in (1, 2, 0xF7)]
    assert run["crc_check"] == 0x4B37  # CRC-16/MODBUS check value of "123456789"
    assert run["pzem_good"]["writes"] == ["01040000000a700d"]


def test_answer_frame_decodes_every_field(run):
    """Every register of a good answer lands in its field, 32-bit values from (low, high) words."""
    g = run["pzem_good"]
    assert g["fields"] == [2301, 81234, 186789, 123456, 500, 92, False]
    assert g["power_w"] == pytest.approx(18678.9) and g["writes_after_power"] == 1
    assert g["fault"] is None
    assert run["pzem_alarm"] is True


def test_single_crc_error_is_retried_without_fault(run):
    """One corrupted answer costs a retry, not a fault; the energy is the good frame's."""
    r = run["crc_single"]
    assert r["energy"] == [250, 0] and r["writes"] == 3 and r["fault"] is None
    assert r["log"] == []


def test_repeated_crc_errors_fault_and_recover(run):
    """Three bad CRCs in a row: fault bad_crc and no energy; the next good read clears it and carries the missed energy."""
    r = run["crc_repeated"]
    assert r["fault_then"] == "bad_crc" and r["fault_now"] is None
    assert r["energy"] == [[0, 0], [500, 0]]
    assert r["writes"] == 1 + 3 + 1
    assert [x["ev"] for x in r["log"]] == ["sensor_fault", "sensor_ok"]
    assert r["log"][0]["reason"] == "bad_crc" and "3 attempts" in r["log"][0]["detail"]


def test_other_bad_answers_have_their_reason(run):
    """A Modbus exception, a foreign address, a wrong byte count and a truncated frame each get their own reason."""
    assert (run["bad_exception"], run["bad_wrong_addr"], run["bad_bad_count"], run["bad_short"]) == \
        ("device_error", "bad_frame", "bad_frame", "short_frame")


def test_silent_device_times_out_in_bounded_time(run):
    """No answer at all: three attempts of 100 ms, then fault timeout, well within a second."""
    r = run["timeout"]
    assert r["fault"] == "timeout" and r["writes"] == 3
    assert 300 <= r["ms"] < 1000


def test_stale_bytes_are_flushed_before_a_request(run):
    """A late answer still in the receive buffer is dropped, not read as the next answer."""
    assert run["stale_flushed"] == 1250


def test_counter_rollover_and_reset(run):
    """A roll-over at 10,000 kWh counts the energy across it; a reset counts from zero; never negative;
    a resumed checkpoint counts what the module measured while the board was down."""
    r = run["counter"]
    assert r["deltas"] == [90, 50, 4999960, 20]
    assert r["log"] == ["counter_wrap", "counter_reset"]
    assert run["resume_pzem"] == [[100, 0], [1000, 0]]


def test_debounce_counts_exactly_the_real_pulses(run):
    """200 pulses with contact bounce on both edges and interference spikes count as exactly 200;
    the IRQ handler ran under heap_lock, so it allocates nothing; it is a hard IRQ on both edges."""
    r = run["pulse_debounced"]
    assert r["count"] == 200
    assert r["alloc_at"] is None and run["heap_lock_catches"] is True
    assert r["hard"] is True and r["trigger"] is True
    assert run["pulse_raw"] > 250  # the same timeline without debounce overcounts: the test can fail


def test_pulse_import_and_export_channels(run):
    """800 imp/kWh: 1000 import pulses are 1250 Wh; export fractions carry into the next interval exactly."""
    r = run["pulse_channels"]
    assert r["energy"] == [[1250, 0], [0, 3], [0, 2]]
    assert r["totals"] == [1250, 5]
    assert r["imp_w"] == 1000  # 1.25 Wh every 4.5 s
    assert r["exp_w"] == -2000  # export shows as negative power
    assert -1000 < r["late_w"] < 0  # overdue pulses: the estimate decays
    assert run["pulse_resume"] == {"totals": [5012, 7], "energy": [12, 0], "checkpoint": [5012, 7]}


def test_pulse_without_hard_irqs_and_with_hardware_counters(run):
    """Where pin IRQs cannot be hard (ESP32) the channel still counts; ESP32 hardware counters
    count across their 16-bit wrap, with the export channel apart and power from the count rate."""
    assert run["pulse_soft"] == {"hard": False, "count": 5}
    r = run["pulse_counter"]
    assert r["wrapped"] is True
    assert r["energy"] == [1250, 3] and r["totals"] == [1250, 3]
    assert r["w"] == 1000
    assert run["make_pulse_esp32"] == {"channels": ["CounterChannel", "CounterChannel"],
                                       "counters": [[0, 25, 2, 12000, 1], [1, 26, 2, 12000, 1]]}
    assert run["make_pulse_esp32_irq"] == ["PulseChannel", False]


def test_ct_rms_current_within_tolerance(run):
    """Sampled sine plus 1.5 LSB noise: RMS within 2% at 10 A and 5% at 1 A; no current reads exactly 0."""
    r = run["ct_rms"]
    assert r["A10"] == pytest.approx(10, rel=0.02)
    assert r["A1"] == pytest.approx(1, rel=0.05)
    assert r["A0"] == 0 and r["0"] == 0
    assert r["10"] == pytest.approx(2300, rel=0.02)  # nominal 230 V, pf 1


def test_ct_window_disturbed_by_a_stall_is_retaken(run):
    """A 5 ms stall inside a sampling window makes the driver take the window again; stalls every time are counted."""
    assert run["ct_stall"]["reads"] == 2 * 400 and run["ct_stall"]["uneven"] == 0
    assert run["ct_stall"]["a"] == pytest.approx(2300, rel=0.02)
    assert run["ct_stalls"] == {"reads": 3 * 400, "uneven": 1}


def test_ct_real_power_with_measured_voltage(run):
    """With the voltage sampled, power is real power (pf 0.8 -> 1840 W) and its sign shows export."""
    r = run["ct_real"]
    assert r["v"] == pytest.approx(230, rel=0.02)
    assert r["a"] == pytest.approx(10, rel=0.02)
    assert r["w"] == pytest.approx(1840, rel=0.03) and r["uneven"] == 0
    assert run["ct_export_w"] == pytest.approx(-2300, rel=0.03)


def test_ct_energy_integrates_between_reads(run):
    """15 minutes at 2300 W sampled once a minute is 575 Wh; exporting 16 minutes goes to the export slot."""
    imp, exp = run["ct_energy"]["energy"]
    assert imp == pytest.approx(575, rel=0.02) and exp == 0
    assert run["ct_energy"]["totals"] == [imp, 0]
    imp, exp = run["ct_export_energy"]
    assert imp == 0 and exp == pytest.approx(2300 * 16 / 60, rel=0.03)


def test_make_wires_the_board_profile(run):
    """sensors.make takes UART, pins and ADC channels from the Pico profile, with pull-ups on pulse inputs."""
    wiring, uarts = PROFILES["pico"]["wiring"], PROFILES["pico"]["uarts"]
    m = run["make_pzem"]
    u = str(wiring["pzem"]["uart"])
    assert (m["uart"], m["tx"], m["rx"], m["baud"]) == (int(u), uarts[u]["tx"], uarts[u]["rx"], 9600)
    assert m["fault"] == "timeout"  # nothing answers the fake UART: reported, not raised
    assert m["temp_src"] == 4
    p = run["make_pulse"]
    assert p["pins"] == [[wiring["pulse"]["import_pin"], 1, True], [wiring["pulse"]["export_pin"], 1, True]]
    assert p["per_kwh"] == 500
    chans = PROFILES["pico"]["adc"]["channels"]
    assert sorted(run["make_ct"]["adc"]) == sorted([chans[str(wiring["ct"]["adc"])], chans[str(wiring["ct"]["v_adc"])]])
    assert run["make_ct"]["min_a"] == pytest.approx(3 * 3.3 / 4096 * 2000 / 33)
    esp = PROFILES["esp32-devkitc"]
    assert run["make_ct_esp32"] == {"adc": esp["adc"]["channels"][str(esp["wiring"]["ct"]["adc"])], "atten": 3,
                                    "temp": None}
    assert run["make_override"] == [16, True]
    assert run["die_temp"] == pytest.approx(27, abs=0.5)


def test_bad_sensor_configs_are_refused_with_a_reason(run):
    """Unknown type or key, no wiring on the board, an unknown UART or a bad value: ConfigError with a reason."""
    e = run["make_errors"]
    assert {k: v[0] for k, v in e.items()} == {
        "unknown_type": "unknown_type", "unknown_key": "unknown_key", "no_wiring": "missing_key",
        "no_uart": "bad_value", "bad_per_kwh": "bad_value", "no_adc": "bad_value", "no_burden": "missing_key"}
    assert "'import_pin'" in e["no_wiring"][1] and "unix" in e["no_wiring"][1]
    assert "per_kwh" in e["bad_per_kwh"][1]


def test_sim_source_keeps_the_simulators_numbers(run):
    """Behind the interface the simulator gives exactly simsensor.py's energy, and totals add it up."""
    s = run["sim"]
    assert s["same"] is True and s["kind"] == "sim" and s["temp"] is None
    assert s["totals"][0] > 0 and s["totals"][1] > 0  # a day with 4 kWp of solar both imports and exports


def test_board_profiles_load_and_bad_ones_are_refused(run):
    """All four profiles load; each broken profile fails with its own reason; names cannot escape boards/."""
    assert run["boards"]["pico"]["max_ms"] == 8388 and run["boards"]["pico-w"]["max_ms"] == 8388
    assert run["boards"]["unix"] is None
    assert run["boards"]["esp32-devkitc"]["max_ms"] > 8388
    e = run["board_errors"]
    assert {k: v[0] for k, v in e.items()} == {
        "missing_key": "missing_key", "unknown_key": "unknown_key", "bad_type": "bad_type",
        "pin_conflict": "pin_conflict", "pin_reserved": "pin_reserved", "pin_range": "bad_value",
        "pin_bool": "bad_value", "wiring_uart": "bad_value", "wiring_adc": "bad_value", "wiring_kind": "unknown_key",
        "watchdog": "bad_value", "adc_bits": "bad_value",
        "load ../etc": "unknown_board", "load nope": "unknown_board", "load ": "unknown_board",
        "select pico": "wrong_platform"}
    assert "UART1 tx" in e["pin_conflict"][1]
    assert run["default_board"] == "unix"


def test_watchdog_clamps_to_the_board_limit(run):
    """30 s on a Pico is clamped to 8388 ms with a log line; armed on the first feed, fed after; off on Unix."""
    w = run["watchdog"]
    p = w["pico 30000"]
    assert p["timeout"] == 8388 and p["armed_before_feed"] == 0 and p["wdts"] == [[8388, 2]]
    assert [x["ev"] for x in p["log"]] == ["watchdog_clamped", "watchdog_armed"]
    assert p["log"][0]["asked_ms"] == 30000 and p["log"][0]["max_ms"] == 8388
    assert w["pico None"]["wdts"] == [[8000, 2]]
    assert w["esp32-devkitc 30000"]["wdts"] == [[30000, 2]]
    for key in ("unix 30000", "pico 0", "pico on unix"):
        assert w[key]["timeout"] is None and [x["ev"] for x in w[key]["log"]] == ["watchdog_off"]
    assert "no machine.WDT" in w["pico on unix"]["log"][0]["why"]
    assert "1000" in w["too short"]


def test_drivers_keep_the_heap_flat_in_64k(firmware_bundle):
    """PZEM, pulse and CT drivers from the bundle, 300 main-loop cycles in a 64 KiB heap with
    gc.collect per cycle: the heap in use after the last cycle is what it was after the first."""
    mp = MicroPython([firmware_bundle, MP_SCRIPTS])
    r = mp.run_json(MP_SCRIPTS / "mp_sensor_heap.py", 300, answer(), heap="64k")
    assert r["pulses"] == 300 and r["pzem_fault"] is False
    assert r["last"] == r["first"] and r["max"] == r["first"]


def test_bundle_carries_packages_and_profiles(firmware_bundle):
    """The flashed bundle holds the sensors package compiled and every board profile as JSON."""
    names = {p.relative_to(firmware_bundle).as_posix() for p in firmware_bundle.rglob("*") if p.is_file()}
    want = {p.relative_to(FIRMWARE_SRC).with_suffix(".mpy").as_posix() for p in FIRMWARE_SRC.rglob("*.py")
            if p.name != "main.py"}
    assert want <= names and "sensors/pzem.mpy" in names
    assert {f"profiles/{n}.json" for n in PROFILES} <= names


# --- the meter process picks board and sensor from its config ---

def meter_config(tmp_path, broker, **changes):
    """A meter config whose clock has already stopped: the meter boots and has nothing to measure."""
    cfg = tmp_path / "m1" / "config.json"
    write_meter_config(cfg, meter="m1", area="area1", state_dir=tmp_path / "m1", key_file=tmp_path / "m1" / "key",
                       n=N, host=broker.host, port=broker.port, interval_s=900,
                       clock={"scale": 1, "real_start": 0, "virtual_start": 0, "stop_at": 0}, seed=1)
    (tmp_path / "m1" / "key").write_bytes(bytes(range(32)))
    doc = json.loads(cfg.read_text())
    doc.update(changes)
    cfg.write_text(json.dumps(doc))
    return cfg


def boot_meter(tmp_path, broker, bundle, **changes) -> tuple[int, list[str]]:
    """Boot the flashed bundle's meter with a config edited by `changes`; it stops right
    after boot. (exit code, log lines)"""
    cfg = meter_config(tmp_path, broker, **changes)
    log = tmp_path / "m1.log"
    p = meter_process(cfg, log, firmware=bundle)
    try:
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, log.read_text().splitlines()


def test_meter_boots_on_the_unix_profile_without_a_watchdog(tmp_path, broker, firmware_bundle):
    """A testbed meter (no "board") runs on the unix profile and logs once that it has no watchdog."""
    code, lines = boot_meter(tmp_path, broker, firmware_bundle)
    assert code == 0, lines
    events = [json.loads(x) for x in lines if x.startswith("{")]
    off = [e for e in events if e["ev"] == "watchdog_off"]
    assert len(off) == 1 and off[0]["why"] == "board unix has no watchdog"
    assert [e["ev"] for e in events][-1] == "done"


def test_meter_step_feeds_the_watchdog_once_per_loop(tmp_path, broker, firmware_bundle):
    """A real Meter with a fake WDT on the Pico's limits: armed (clamped to 8388 ms) by the first
    completed step, then fed once by each following step."""
    mp = MicroPython([firmware_bundle, MP_SCRIPTS])
    # More than METER_HEAP: the harness lives in the meter's heap too. fakehw.py is compiled
    # there from source and boards stays loaded (14.7 KB more before the meter boots), and their
    # names push the interned strings into a sixth qstr pool (7.1 KB; docs/architecture.md,
    # meter memory). The plain meter runs in METER_HEAP: test_meter_heap.py.
    r = mp.run_json(MP_SCRIPTS / "mp_meter_watchdog.py", meter_config(tmp_path, broker), 12, heap="160k")
    assert r["wdts"] == [[8388, 11]]


@pytest.mark.parametrize("changes, error", [
    ({"board": "pico"}, "BoardError: board profile: wrong_platform: profile pico is for rp2"),
    ({"board": "pico-x"}, "BoardError: board profile: unknown_board: no profile pico-x.json"),
    ({"sensor": {"type": "pzem"}}, "ConfigError: sensor config: missing_key: pzem sensor: no 'uart'"),
    ({"sensor": {"type": "sim", "seeed": 3}}, "ConfigError: sensor config: unknown_key: sim sensor has no setting 'seeed'"),
    ({"watchdog_ms": 10}, "ValueError: watchdog_ms must be an int >= 1000"),
], ids=["wrong_platform", "unknown_board", "no_uart_on_unix", "typo", "watchdog_too_short"])
def test_meter_refuses_a_bad_board_or_sensor_config_at_boot(tmp_path, broker, firmware_bundle, changes, error):
    """A meter whose board or sensor config is wrong stops at boot and says why, before measuring anything."""
    code, lines = boot_meter(tmp_path, broker, firmware_bundle, **changes)
    assert code != 0
    assert any(error in x for x in lines), lines[-5:]
    assert not (tmp_path / "m1" / "state.json").exists()


# --- hardware/wiring.md must say what the profiles say ---

def pin_table() -> str:
    """The per-board pin table of hardware/wiring.md, generated from the profiles."""
    rows = ["| board | PZEM UART (TX, RX) | pulse import | pulse export | CT ADC (pin) | voltage ADC (pin) | LED | watchdog max |",
            "|---|---|---|---|---|---|---|---|"]
    for name in ("esp32-devkitc", "pico-w", "pico", "unix"):
        b = PROFILES[name]
        w = b["wiring"]

        def gp(p):
            return "—" if p is None else (f"GPIO{p}" if isinstance(p, int) else f'"{p}"')

        def adc(key):
            if "ct" not in w:
                return "—"
            ch = w["ct"][key]
            return f"{ch} ({gp(b['adc']['channels'][str(ch)])})"

        if "pzem" in w:
            u = str(w["pzem"]["uart"])
            uart = f"UART{u} ({gp(b['uarts'][u]['tx'])}, {gp(b['uarts'][u]['rx'])})"
        else:
            uart = "—"
        pulse = w.get("pulse", {})
        wd = b["watchdog"]
        rows.append(f"| `{name}` | {uart} | {gp(pulse.get('import_pin'))} | {gp(pulse.get('export_pin'))} | "
                    f"{adc('adc')} | {adc('v_adc')} | {gp((b['led'] or {}).get('pin'))} | "
                    f"{'—' if wd is None else str(wd['max_ms']) + ' ms'} |")
    return "\n".join(rows)


def test_wiring_doc_pin_table_matches_the_profiles():
    """The pin table in hardware/wiring.md is exactly the one the JSON profiles generate."""
    doc = (ROOT / "hardware" / "wiring.md").read_text()
    m = re.search(r"<!-- pin-table: generated from hardware/boards/\*\.json -->\n(.*?)\n<!-- /pin-table -->", doc, re.S)
    assert m, "wiring.md lost its pin-table markers"
    assert m.group(1) == pin_table(), "regenerate with: python -c 'import test_sensors as t; print(t.pin_table())'"
