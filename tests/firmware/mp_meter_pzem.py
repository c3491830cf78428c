# Under MicroPython: the meter's main loop (meter.main, config in argv[1]) with a
# PZEM-004T on a fake UART instead of the configured sensor. The fake device's
# energy register is the Wh written in the file argv[2]: the test moves it, also
# while the meter is down, like a module powered from the mains side.
import struct
import sys

import meter
from sensors.pzem import Pzem, crc16


class DeviceUart:
    # Answers every request with the register read from the file at that moment.
    def __init__(self, path):
        self.path = path
        self.rx = b""

    def write(self, data):
        with open(self.path) as f:
            wh = int(f.read())
        b = bytearray(25)
        b[0:3] = b"\x01\x04\x14"
        struct.pack_into(">10H", b, 3, 2300, 1000, 0, 2300, 0, wh & 0xFFFF, wh >> 16, 500, 100, 0)
        struct.pack_into("<H", b, 23, crc16(b, 23))
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


meter._make_sensor = lambda cfg, board: Pzem(DeviceUart(sys.argv[2]), log=meter.log)
meter.main([sys.argv[0], sys.argv[1]])
