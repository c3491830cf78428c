# Under MicroPython: the firmware's journal and counters, driven by a JSON job
# (argv[1]) from tests/test_journal.py; prints its results as JSON lines.
#   write:     append the job's payloads to a fresh journal in job["dir"]
#   recover:   for each case, copy job["src"] to job["dir"], damage the copy
#              (truncate / xor bytes), recover, optionally append one more
#              record and recover again; one line per case, every record read
#   full:      capacity behaviour for one when_full policy
#   cursor:    the send loop's position across a restart whose recovered
#              segments are all acknowledged and deleted, then new appends
#   reopen:    restarts on an intact last segment and on a torn one: where
#              the next record goes
#   counters:  save job["saves"] times; or load each case's slot bytes (a
#              line per case), then save once more
import binascii
import gc
import json
import os
import sys

import counters
import journal

with open(sys.argv[1]) as f:
    job = json.load(f)


def wipe(d):
    journal.mkdirs(d)
    for name in os.listdir(d):
        os.remove(d + "/" + name)


def copy(src, dst):
    wipe(dst)
    for name in os.listdir(src):
        with open(src + "/" + name, "rb") as f:
            data = f.read()
        with open(dst + "/" + name, "wb") as f:
            f.write(data)


def listing(j):
    out = []
    pos = j.first()
    while pos is not None:
        p = j.read(pos)
        out.append([j.key(pos), None if p is None else binascii.crc32(p) & 0xFFFFFFFF])
        pos = j.after(pos)
    return out


def damage(d, ops):
    for op in ops:
        path = d + "/" + op["file"]
        with open(path, "rb") as f:
            data = bytearray(f.read())
        if op["op"] == "cut":
            data = data[:op["at"]]
        else:
            data[op["at"]] ^= op["xor"]
        with open(path, "wb") as f:
            f.write(data)


mode = job["mode"]
if mode == "write":
    wipe(job["dir"])
    j = journal.Journal(job["dir"], job.get("capacity", 1000), per_segment=job["per_segment"])
    j.recover(0)
    for h in job["payloads"]:
        assert j.append(binascii.unhexlify(h))
    print(json.dumps({"live": j.live}))
elif mode == "recover":
    # One line per case: the results of hundreds of cases would not fit the heap.
    for case in job["cases"]:
        copy(job["src"], job["dir"])
        damage(job["dir"], case["ops"])
        j = journal.Journal(job["dir"], 1000, per_segment=job["per_segment"])
        j.recover(0)
        r = {"records": listing(j), "damaged": j.damaged}
        if case.get("append"):
            ok = j.append(binascii.unhexlify(job["append"]))
            j = journal.Journal(job["dir"], 1000, per_segment=job["per_segment"])
            j.recover(0)
            r["appended"] = ok
            r["after_append"] = listing(j)
        print(json.dumps(r))
        gc.collect()
elif mode == "full":
    wipe(job["dir"])
    j = journal.Journal(job["dir"], job["capacity"], job["when_full"], per_segment=job["per_segment"])
    j.recover(0)
    kept = []
    for h in job["payloads"]:
        kept.append(j.append(binascii.unhexlify(h)))
    out = {"kept": kept, "live": j.live, "full": j.full(), "dropped": j.dropped, "floor": j.floor,
           "records": listing(j), "files": len(os.listdir(job["dir"]))}
    j.advance(job["ack"])
    out["after_ack"] = {"live": j.live, "full": j.full(), "records": listing(j),
                        "files": len(os.listdir(job["dir"]))}
    # Everything acknowledged, then more records: the open segment forgets its
    # index and keeps counting; positions and reads still line up.
    j.advance(job["ack_all"])
    for h in job["more"]:
        j.append(binascii.unhexlify(h))
    out["more"] = {"live": j.live, "records": listing(j), "files": len(os.listdir(job["dir"]))}
    j2 = journal.Journal(job["dir"], job["capacity"], job["when_full"], per_segment=job["per_segment"])
    j2.recover(j.floor)
    out["recovered"] = listing(j2)
    print(json.dumps(out))
elif mode == "cursor":
    ps = [binascii.unhexlify(p) for p in job["payloads"]]
    wipe(job["dir"])
    j = journal.Journal(job["dir"], 64)
    j.append(ps[0])                       # reading 1, unacked at the "power cut"
    with open(j._file(1), "ab") as f:
        f.write(journal.MAGIC + b"\x00\xc8")  # and the torn start of the next record
    j = journal.Journal(job["dir"], 64)
    j.recover(0)                          # a restart: reading 1 in a sealed segment
    cursor = j.first()                    # the send loop published it
    j.advance(1)                          # its ack deletes that segment
    for p in ps[1:]:
        j.append(p)                       # readings 2, 3 ...
    nxt = j.after(cursor)
    got = []
    while nxt is not None:
        got.append(j.key(nxt))
        nxt = j.after(nxt)
    print(json.dumps({"after_cursor": got}))
elif mode == "reopen":
    # Restarts on an intact last segment, then on one with a torn tail: the
    # files after each restart's append, and every record read back.
    ps = [binascii.unhexlify(p) for p in job["payloads"]]
    wipe(job["dir"])
    j = journal.Journal(job["dir"], 64)
    j.append(ps[0])
    j = journal.Journal(job["dir"], 64)
    j.recover(0)
    j.append(ps[1])
    intact = sorted(os.listdir(job["dir"]))
    with open(j._file(1), "ab") as f:
        f.write(journal.MAGIC + b"\x00\xc8" + ps[2][:20])  # a record cut short
    j = journal.Journal(job["dir"], 64)
    j.recover(0)
    j.append(ps[3])
    torn = sorted(os.listdir(job["dir"]))
    j = journal.Journal(job["dir"], 64)
    j.recover(0)
    print(json.dumps({"intact": intact, "torn": torn, "records": listing(j), "damaged": j.damaged}))
elif mode == "counters":
    store = counters.CounterStore(job["dir"] + "/counters")
    if "saves" in job:
        journal.mkdirs(job["dir"])
        c = counters.Counters()
        for i in range(1, job["saves"] + 1):
            c.seq, c.t, c.import_wh, c.prev = i, 1000 * i, 7 * i, bytes([i]) * 32
            store.save(c)
        print(json.dumps({"gen": c.gen}))
    else:
        for case in job["cases"]:
            wipe(job["dir"])
            for i in (0, 1):
                if case[i] is not None:
                    with open(store.paths[i], "wb") as f:
                        f.write(binascii.unhexlify(case[i]))
            store = counters.CounterStore(job["dir"] + "/counters")
            c = store.load()
            r = None
            if c is not None:
                was = store.slot
                r = {"gen": c.gen, "seq": c.seq, "t": c.t, "import_wh": c.import_wh,
                     "prev": binascii.hexlify(c.prev).decode(), "slot": was}
                c.seq += 1  # the next write must leave the slot it was read from intact
                store.save(c)
                again = counters.CounterStore(job["dir"] + "/counters").load()
                r["written"] = store.slot
                r["then"] = [again.gen, again.seq]
            print(json.dumps(r))
            gc.collect()
