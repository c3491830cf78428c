# Under MicroPython: the meter's main loop (meter.main, config in argv[1]) with a
# PZEM-004T on a fake UART instead of the configured sensor. The fake device's
# energy register is the Wh written in the file argv[2]: the test moves it, also
# while the meter is down, like a module powered from the mains side.
import sys

import meter
from fakepzem import DeviceUart
from sensors.pzem import Pzem


meter._make_sensor = lambda cfg, board: Pzem(DeviceUart(sys.argv[2]), log=meter.log)
meter.main([sys.argv[0], sys.argv[1]])
