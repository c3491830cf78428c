# A fake PZEM-004T for meter runs under MicroPython (its own module: the 64 KiB
# driver heap test loads fakehw, and must not pay for this).
import struct
class DeviceUart:
    # A PZEM-004T on a UART whose energy register is the Wh written in the file
    # `path` (the test moves it, also while the meter is down): every request is
    # answered with the register read from the file at that moment.
    def __init__(self, path):
        self.path = path
        self.rx = b""

    def write(self, data):
        with open(self.path) as f:
            wh = int(f.read())
        b = bytearray(25)
        b[0:3] = b"\x01\x04\x14"
        struct.pack_into(">10H", b, 3, 2300, 1000, 0, 2300, 0, wh & 0xFFFF, wh >> 16, 500, 100, 0)
        struct.pack_into("<H", b, 23, _crc16(b, 23))
        self.rx += bytes(b)
        return len(data)

    def any(self):
        return len(self.rx)

    def read(self, n=None):
        out, self.rx = self.rx, b""
        return out

    def readinto(self, buf):
        n = min(len(buf), len(self.rx))
        buf[:n] = self.rx[:n]
        self.rx = self.rx[n:]
        return n


def _crc16(data, n):
    from sensors.pzem import crc16
    return crc16(data, n)
