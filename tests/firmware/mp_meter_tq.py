# Under MicroPython: the meter's main loop (meter.main, config in argv[1]) as on a
# board whose clock was never set: its RTC starts at 2000-01-01 at power-on and NTP
# does not answer until the file argv[3] exists; then NTP sets the clock to the
# host's. The sensor is a PZEM-004T on a fake UART whose energy register is the Wh
# written in the file argv[2] (tests/test_timeq.py moves it).
import os
import sys
import time

import clock
import meter
from fakepzem import DeviceUart
from sensors.pzem import Pzem

Y2000 = 946684800


class Board:
    def __init__(self, ntp_file):
        self.ntp_file = ntp_file
        self.set = False
        self.t0 = time.ticks_ms()

    def wall(self):
        if self.set:
            return time.time()
        return Y2000 + time.ticks_diff(time.ticks_ms(), self.t0) // 1000

    def ntp(self):
        try:
            os.stat(self.ntp_file)
        except OSError:
            raise OSError(110)  # no answer: ETIMEDOUT, as ntptime raises it
        self.set = True


board = Board(sys.argv[3])
meter.Clock = lambda cfg: clock.Clock(cfg, wall=board.wall, ntp=board.ntp, host=False)
meter._make_sensor = lambda cfg, b: Pzem(DeviceUart(sys.argv[2]), log=meter.log)
meter.main([sys.argv[0], sys.argv[1]])
