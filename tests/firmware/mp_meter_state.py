# Under MicroPython: open a meter's state the way a booting meter does (counters,
# journal, a one-time migration from state.json + spool/) without counting a boot,
# and print every record still to send as the meter would publish it.
import json
import sys

import meter

with open(sys.argv[1]) as f:
    cfg = json.load(f)
st = meter._open_state(cfg, int(cfg["paillier"]["n"]), boot=False)
j = st.journal
out = []
pos = j.first()
while pos is not None:
    eseq, payload = st.message(pos)
    out.append({"event": eseq > 0, "payload": payload.decode()})
    pos = j.after(pos)
c = st.c
print(json.dumps({"records": out, "seq": c.seq, "t": c.t, "acked": c.acked, "import_wh": c.import_wh,
                  "export_wh": c.export_wh, "eseq": c.eseq}))
