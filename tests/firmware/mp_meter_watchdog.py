# Under MicroPython: a real Meter (config argv[1]) whose watchdog is a fake
# machine.WDT with the Pico's limits; runs argv[2] main-loop steps and reports
# how the watchdog was armed and fed.
import sys
import json

import fakehw
import boards
import meter
from watchdog import Watchdog

m = meter.Meter(meter._load(sys.argv[1]))
m.watchdog = Watchdog(boards.load("pico"), 30000, meter.log, fakehw.WDT)
steps = int(sys.argv[2])
for _ in range(steps):
    m.step()
m.uplink.close()
print(json.dumps({"steps": steps, "wdts": [(w.timeout, w.feeds) for w in fakehw.WDT.made]}))
