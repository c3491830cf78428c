# Under MicroPython: the meter's full loop (measure, encrypt, sign, journal,
# publish or fail to publish, take acks) for argv[2] cycles, one reading per
# cycle, with the config in argv[1]. Prints a "cycle" line every 50 cycles (the
# test stops and restarts the broker by them), then one JSON line with
# gc.mem_free() after gc.collect() at cycles 100 and the last, each measured
# once the gateway has acknowledged everything (the journal drained), after
# micropython.qstr_info()'s line. A config with an "alerts" table makes a meter
# with device alerts: the marks then also wait for its outbox to empty.
import gc
import json
import micropython
import sys
import time

import meter

with open(sys.argv[1]) as f:
    cfg = json.load(f)
cycles = int(sys.argv[2])
m = meter.Meter(cfg)
j = m.state.journal


def service():
    m.uplink.poll()
    m._send_pending()
    m.uplink.poll()
    # the loop's idle work: a refill, or a resend's ciphertext computed again
    return m.pool.step()


def drained_free():
    deadline = time.ticks_add(time.ticks_ms(), 60000)
    while (j.live or m.alerts is not None and m.alerts.pending) and time.ticks_diff(deadline, time.ticks_ms()) > 0:
        service()
        time.sleep_ms(20)
    gc.collect()
    return gc.mem_free(), j.live + (len(m.alerts.pending) if m.alerts is not None else 0)


marks = {}
lowest = None
for i in range(1, cycles + 1):
    m.take_reading(m.next_end)
    m.next_end += m.interval
    # The meter's loop runs its idle steps between readings (Meter.step): here
    # a few per cycle, so that readings resent after the outage, each computed
    # again from its seed, catch up with the new ones.
    k = 8
    while service() and k:
        gc.collect()
        k -= 1
    if not m.pool.full():
        m.pool.refill_one()
    gc.collect()
    free = gc.mem_free()
    lowest = free if lowest is None else min(lowest, free)
    if i % 50 == 0:
        print(json.dumps({"cycle": i, "free": free, "depth": j.live}))
    if i == 100 or i == cycles:
        marks[str(i)] = drained_free()
micropython.qstr_info()  # the interned names: a sixth pool would cost 7 KB (docs/architecture.md)
print(json.dumps({"marks": marks, "lowest_free": lowest, "health": m._health(), "seq": m.seq,
                  "modules": sorted(sys.modules),
                  "alerts": None if m.alerts is None else {"seq": m.alerts.seq, "dropped": m.alerts.dropped,
                                                           "pending": len(m.alerts.pending)}}))
