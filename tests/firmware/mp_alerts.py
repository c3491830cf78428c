# Under MicroPython: the alert vectors rebuilt by the firmware, and the
# threshold / hysteresis / persistence rules of firmware/alerts.py driven with a
# fake sensor. Prints one JSON object for tests/test_alerts.py to check.
import sys
import json
import binascii
import os
import time
import alerts
import ed25519

with open(sys.argv[1]) as f:
    doc = json.load(f)
state = sys.argv[2]
key = ed25519.SigningKey(binascii.unhexlify(doc["meter_key"]["seed"]))
out = {"public": binascii.hexlify(key.public).decode(), "vectors": []}
for v in doc["alerts"]:
    args = (v["meter"], v["seq"], v["t"], v["kind"], v["value"], v["threshold"], v["state"])
    sb = alerts.signed_bytes(*args)
    sig = binascii.hexlify(key.sign(sb)).decode()
    out["vectors"].append({"signed_bytes": sb.decode(), "payload": alerts.encode(*(args + (sig,))).decode()})


class FakeSensor:
    # power_w / temp_c as a real driver offers them; None: not available now.
    def __init__(self):
        self.p = None
        self.temp = None

    def power_w(self):
        return self.p

    def temp_c(self):
        return self.temp


class EnergyOnly:
    pass  # the simulated sensor: interval energy only


logged = []


def log(ev, **kw):
    kw["ev"] = ev
    logged.append(kw)


def outbox():
    # The outbox's payloads live in alerts.json (the meter keeps only their seqs in RAM).
    with open(state + "/alerts.json") as f:
        return json.load(f)["pending"]


def events(a, since):
    assert a.pending == [s for s, _ in outbox()]
    return [[json.loads(p)["kind"], json.loads(p)["state"], json.loads(p)["value"]] for s, p in outbox() if s > since]


cfg = {"power_high_w": 3000, "power_low_w": 100, "power_hyst_w": 100, "temp_high_c": 70, "temp_hyst_c": 2,
       "resend_s": 1, "max_pending": 12}
s = FakeSensor()
a = alerts.Alerts(cfg, state, "m1", key, s, log)
t = 1767225600
power = [2000, 3000, 3001, 3500, 2950, 2900, 2899, 3050, None, 2000, 99, 150, 200, 201, 50]
for p in power:
    s.p = p
    t += 900
    a.evaluate(t, 900, 0, 0)
out["power"] = events(a, 0)
last = a.seq

temps = [69.9, 70.0, 70.1, 68.5, 68.0, 67.9, None, 75.25]
s.p = None
for c in temps:
    s.temp = c
    t += 900
    a.evaluate(t, 900, 0, 0)
out["temp"] = events(a, last)
out["active_before_reboot"] = sorted(a.active)
out["seq_before_reboot"] = a.seq

# A reboot: the same state folder. The seq continues, the temperature
# excursion under way is not raised again, unacked alerts are still pending.
b = alerts.Alerts(cfg, state, "m1", key, EnergyOnly(), log)
out["after_reboot"] = {"seq": b.seq, "active": sorted(b.active), "pending": list(b.pending)}
# Energy only: average power over the interval, import minus export.
last = b.seq
for imp, exp in [(1000, 0), (0, 500), (10, 0)]:
    t += 900
    b.evaluate(t, 900, imp, exp)
out["energy"] = events(b, last)
out["pending"] = [p for _, p in outbox()]
out["dropped"] = b.dropped
out["dropped_logged"] = [x["seq"] for x in logged if x["ev"] == "alert_dropped"]

# Resending: every pending alert is due, not again until resend_s, then again;
# handed out at most 4 at a time (the uplink sends each batch before asking again).


def send_due(a, mark=True):
    got, batches = [], []
    while True:
        batch = [x[0] for x in a.due()]
        if not batch:
            return got, max(batches or [0])
        batches.append(len(batch))
        got += batch
        if not mark:
            return got, max(batches)
        for seq in batch:
            a.sent(seq)


due0, most = send_due(b)
due1, _ = send_due(b)
time.sleep_ms(1050)
due2, _ = send_due(b)
b.unsent()
due3, _ = send_due(b)
out["batch_most"] = most
out["due"] = [due0, due1, due2, due3]
# Acks are cumulative; a nack drops that one alert; both persist.
acked_to = b.pending[2]
b.acked(acked_to)
refused = b.pending[-1]
b.refused(refused, "bad_signature")
c = alerts.Alerts(cfg, state, "m1", key, EnergyOnly(), log)
out["after_ack"] = {"acked_to": acked_to, "refused": refused, "pending": list(c.pending), "seq": c.seq}
# A flash that cannot be written: no alert is taken (its seq would not survive a
# reboot), the failure is logged, and measuring goes on.
save = alerts.save


def broken(path, state):
    raise OSError(28)  # ENOSPC


alerts.save = broken
before = (c.seq, len(c.pending))
t += 900
c.evaluate(t, 900, 2000, 0)  # 8000 W: would raise power_high
alerts.save = save
out["flash_full"] = {"before": before, "after": (c.seq, len(c.pending), sorted(c.active)),
                     "logged": [x["ev"] for x in logged[-1:]]}
# A corrupt alerts.json: no crash; the seq goes on from the clock's seconds,
# above anything used before, and says so.
with open(state + "/alerts.json", "w") as f:
    f.write('{"seq": 1')
d = alerts.Alerts(cfg, state, "m1", key, EnergyOnly(), log)
out["corrupt"] = {"seq": d.seq, "now": int(time.time()), "logged": logged[-1]["ev"], "pending": len(d.pending)}
# The gateway's answers, as both uplinks hand them over (firmware/answers.py).
import answers

acked = []
e = alerts.Alerts(cfg, state, "m1", key, EnergyOnly(), log)
for imp in (2000, 0):  # 8000 W, then 0 W: three alerts pending
    t += 900
    e.evaluate(t, 900, imp, 0)
pend = list(e.pending)
got = [answers.handle(b'{"seq": 41}', True, acked.append, e, log),
       answers.handle(b'{"seq": 42, "reason": "seq_gap"}', False, acked.append, e, log),
       answers.handle(('{"alert_seq": %d}' % pend[0]).encode(), True, acked.append, e, log),
       answers.handle(('{"alert_seq": %d, "reason": "bad_signature"}' % pend[-1]).encode(), False, acked.append, e,
                      log),
       answers.handle(b"not json", True, acked.append, e, log)]
out["answers"] = {"returned": got, "reading_acks": acked, "pending_before": pend,
                  "pending_after": list(e.pending), "logged": [x["ev"] for x in logged[-3:]],
                  "file_after": [s for s, _ in outbox()]}
out["tmp_left"] = [n for n in os.listdir(state) if n.endswith(".tmp")]
print(json.dumps(out))
