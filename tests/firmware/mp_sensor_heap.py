# Under MicroPython in a small heap: every hardware driver built by sensors.make
# from the Pico profile (fake peripherals), run for many main-loop cycles with a
# gc.collect per cycle as the meter does. Prints the heap in use after the first
# and the last cycles: it must not grow.
import gc
import sys
import json
import binascii

import fakehw
import boards
import sensors

cycles = int(sys.argv[1])
pico = boards.load("pico")
pzem = sensors.make({"type": "pzem", "timeout_ms": 20, "retries": 0}, pico, hw=fakehw)
uart = fakehw.UART.made[-1]
frame = binascii.unhexlify(sys.argv[2])
pulse = sensors.make({"type": "pulse", "debounce_ms": 0}, pico, hw=fakehw)
ct = sensors.make({"type": "ct", "ratio": 2000, "burden_ohm": 22, "volts_per_volt": 460, "every_ms": 0,
                   "samples": 200, "cycles": 2}, pico, hw=fakehw)
pin = [p for p in fakehw.Pin.made if p.id == pico["wiring"]["pulse"]["import_pin"]][0]
first = peak = 0
for k in range(cycles):
    uart.answers = [frame]
    uart.writes.clear()  # the fake records requests; the driver keeps nothing
    for s in (pzem, pulse, ct):
        s.poll()
        s.energy(k * 900, k * 900 + 900)
        s.power_w()
        s.temp_c()
    pin.drive(0)
    pin.drive(1)
    gc.collect()
    now = gc.mem_alloc()
    if k == 0:
        first = now
    peak = max(peak, now)
print(json.dumps({"first": first, "last": now, "max": peak, "pulses": pulse.imp.count,
                  "pzem_fault": pzem.fault is not None}))
