# Under MicroPython: a board's littlefs, built in RAM at the size its profile
# gives (hardware/boards/*.json fs_bytes, 4 KiB erase blocks, as the rp2 and
# esp32 ports format it), holding the firmware bundle, a config, a key, the
# counters and the journal at its default size in its worst case: `capacity`
# readings waiting and the oldest segment all but one acknowledged, so
# capacity + per_segment - 1 records on flash. job (argv[1]): {fs_bytes,
# progsize, bundle, record: "compact" | "full", capacity}. Prints one JSON line.
import json
import os
import sys
import vfs

import records
from counters import Counters
from journal import Journal, exists

with open(sys.argv[1]) as f:
    job = json.load(f)
BLOCK = 4096


class RamFlash:
    # A block device with the extended interface littlefs uses (offsets, erase).
    def __init__(self, size):
        self.data = bytearray(size)

    def readblocks(self, n, buf, off=0):
        a = n * BLOCK + off
        buf[:] = memoryview(self.data)[a:a + len(buf)]

    def writeblocks(self, n, buf, off=None):
        if off is None:
            off = 0
        a = n * BLOCK + off
        memoryview(self.data)[a:a + len(buf)] = buf

    def ioctl(self, op, arg):
        if op == 4:
            return len(self.data) // BLOCK
        if op == 5:
            return BLOCK
        if op == 6:
            memoryview(self.data)[arg * BLOCK:(arg + 1) * BLOCK] = b"\xff" * BLOCK
            return 0
        return 0


def free_blocks():
    return os.statvfs("/flash")[3]


def put(src, dst):
    for name in os.listdir(src):
        p = src + "/" + name
        if os.stat(p)[0] & 0x4000:
            os.mkdir(dst + "/" + name)
            put(p, dst + "/" + name)
        else:
            with open(p, "rb") as f:
                data = f.read()
            with open(dst + "/" + name, "wb") as f:
                f.write(data)


dev = RamFlash(job["fs_bytes"])
vfs.VfsLfs2.mkfs(dev, progsize=job["progsize"])
vfs.mount(vfs.VfsLfs2(dev, progsize=job["progsize"]), "/flash")
total = free_blocks()
put(job["bundle"], "/flash")
with open("/flash/config.json", "w") as f:
    f.write(" " * 2500)  # a provisioned config with its 2048-bit n and CA certificate
with open("/flash/ed25519.key", "wb") as f:
    f.write(b"k" * 32)
for i in (0, 1):
    with open("/flash/counters.%d" % i, "wb") as f:
        f.write(b"c" * 104)
after_bundle = free_blocks()

# A reading record as the firmware writes it: the compact one through
# records.pack_reading (plaintext values of 3-byte varints, a 16-byte seed),
# or the earlier full one (kind 0x31: dt, kid, signature, time quality and the
# 512-byte ciphertext of a 2048-bit key).
buf = bytearray(1024)
c = Counters()
c.import_wh, c.export_wh = 12345678, 0
if job["record"] == "compact":
    n = records.pack_reading(buf, c, 1, 1795000500, 900, "ab" * 32, b"s" * 64, "cd" * 32,
                             (60000 << 48) | 60000, b"r" * 16, 448, "host")
else:
    n = records.READING_FIXED + 1 + 512
    buf[0] = records.V2 | 0x20 | records.READING
cap = job["capacity"]
j = Journal("/flash/unacked", cap)
j.recover(0)
per = j.per_segment


def fill(upto):
    while j.live < upto:
        buf[1:5] = (j.floor + j.live + 1).to_bytes(4, "big")  # the seq: what acks go by
        if not j.append(memoryview(buf)[:n]):
            return False
    return True


ok = fill(cap) and j.full()
if ok:
    j.advance(per - 1)  # the oldest segment all but one acknowledged: still on flash
    ok = fill(cap)
files = len(os.listdir("/flash/unacked"))
print(json.dumps({"record_bytes": n + 8, "per_segment": per, "ok": ok, "live": j.live,
                  "on_flash": j.live + (per - 1 if ok else 0), "dropped": j.dropped, "files": files,
                  "blocks": total, "bundle_blocks": total - after_bundle, "free_blocks": free_blocks(),
                  "full": j.full(), "exists": exists("/flash/unacked")}))
