# Readings waiting for the gateway's ack: one file per reading, written to a
# temporary name and renamed, so after a power cut a reading is whole or absent.
# (First cut; the CRC-framed journal replaces it.)
import os


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _mkdirs(path):
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i])
        if p and not exists(p):
            os.mkdir(p)


class Spool:
    def __init__(self, path):
        self.path = path
        _mkdirs(path)
        seqs = []
        for name in os.listdir(path):
            if name.endswith(".json"):
                seqs.append(int(name[:-5]))
            elif name.endswith(".tmp"):
                os.remove(path + "/" + name)  # torn write, never acknowledged
        seqs.sort()
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def _file(self, seq):
        return "%s/%d.json" % (self.path, seq)

    def put(self, seq, payload):
        tmp = "%s/%d.tmp" % (self.path, seq)
        with open(tmp, "wb") as f:
            f.write(payload)
        os.rename(tmp, self._file(seq))
        self.seqs.append(seq)

    def get(self, seq):
        with open(self._file(seq), "rb") as f:
            return f.read()

    def discard_after(self, seq):
        # Entries above the meter's persisted seq were written but never
        # committed to its state (power cut in between), so never published.
        while self.seqs and self.seqs[-1] > seq:
            os.remove(self._file(self.seqs.pop()))

    def drop_through(self, seq):
        # The gateway acknowledged every reading up to seq as durable.
        n = 0
        while self.seqs and self.seqs[0] <= seq:
            os.remove(self._file(self.seqs.pop(0)))
            n += 1
        return n
