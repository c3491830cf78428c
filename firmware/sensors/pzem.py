# Peacefair PZEM-004T v3.0 over a UART (9600 8N1), Modbus-RTU: one "read input
# registers" request for all ten registers, the answer checked (length, CRC-16/
# Modbus, address, function) before a field is believed. Its energy register is
# import only: the module cannot tell the direction of power.
import binascii
import struct
import time

from sensors.base import Sensor, SensorFault

_READ = 0x04  # read input registers
_NREGS = 10  # voltage, current (2), power (2), energy (2), frequency, pf, alarm
_ANSWER = 3 + 2 * _NREGS + 2  # addr, func, byte count, registers, CRC
_EXCEPTION = 5  # addr, func | 0x80, code, CRC

KEYS = ("uart", "addr", "baud", "timeout_ms", "retries")


def crc16(data, n=None):
    # CRC-16/MODBUS: reflected polynomial 0xA001, initial 0xFFFF, sent low byte first
    crc = 0xFFFF
    for i in range(len(data) if n is None else n):
        crc ^= data[i]
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def request(addr):
    # 01 04 00 00 00 0A 70 0D for the default address 1 (datasheet example)
    b = bytearray(8)
    struct.pack_into(">BBHH", b, 0, addr, _READ, 0, _NREGS)
    struct.pack_into("<H", b, 6, crc16(b, 6))
    return bytes(b)


class Pzem(Sensor):
    kind = "pzem"
    max_w = 23000  # 100 A at 230 V: the 100 A model's rated range
    wrap = 10000000  # Wh: the energy register counts 0 .. 9999.99 kWh

    def __init__(self, uart, addr=1, timeout_ms=200, retries=2, log=None, temp=None):
        super().__init__(log, temp)
        if not 1 <= addr <= 0xF7:
            raise ValueError("pzem address must be 1..247")
        self._uart = uart
        self._addr = addr
        self._req = request(addr)
        self._timeout = timeout_ms
        self._tries = retries + 1
        self._buf = bytearray(_ANSWER)
        self._mv = memoryview(self._buf)
        # Last good answer, in the device's units: 0.1 V, mA, 0.1 W, Wh, 0.1 Hz, 0.01
        self.deci_volts = self.milli_amps = self.deci_watts = None
        self.energy_wh = self.deci_hz = self.centi_pf = None
        self.alarm = None
        self._read_at = None  # ticks of the last good read
        self._baseline()

    def _exchange(self):
        u = self._uart
        while u.any():
            u.read()  # a late answer to an earlier, timed-out request
        u.write(self._req)
        got = 0
        need = _ANSWER
        deadline = time.ticks_add(time.ticks_ms(), self._timeout)
        while got < need:
            if u.any():
                got += u.readinto(self._mv[got:need]) or 0
                if got >= 2 and self._buf[1] == _READ | 0x80:
                    need = _EXCEPTION
            elif time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                raise SensorFault("timeout" if got == 0 else "short_frame",
                                  "%d of %d bytes in %d ms" % (got, need, self._timeout))
            else:
                time.sleep_ms(2)
        return need

    def _check(self, n):
        b = self._buf
        if crc16(b, n - 2) != b[n - 2] | b[n - 1] << 8:
            raise SensorFault("bad_crc", "frame " + binascii.hexlify(b[:n]).decode())
        if b[0] != self._addr:
            raise SensorFault("bad_frame", "answer from address %d" % b[0])
        if n == _EXCEPTION:
            raise SensorFault("device_error", "modbus exception code %d" % b[2])
        if b[1] != _READ or b[2] != 2 * _NREGS:
            raise SensorFault("bad_frame", "function %d, %d data bytes" % (b[1], b[2]))

    def read(self):
        # One measurement, retried; raises the last attempt's SensorFault
        # after every attempt failed.
        for i in range(self._tries):
            try:
                self._check(self._exchange())
                break
            except SensorFault as e:
                if i + 1 == self._tries:
                    raise SensorFault(e.reason, "%d attempts, last: %s" % (self._tries, e.detail))
        v, il, ih, pl, ph, el, eh, f, pf, al = struct.unpack_from(">10H", self._buf, 3)
        self.deci_volts = v
        self.milli_amps = il | ih << 16
        self.deci_watts = pl | ph << 16
        self.energy_wh = el | eh << 16
        self.deci_hz = f
        self.centi_pf = pf
        self.alarm = al == 0xFFFF
        self._read_at = time.ticks_ms()

    def totals(self):
        self.read()
        return self.energy_wh, 0

    def power_w(self):
        # A fresh read unless the last good one is under a second old: alert
        # checks may ask every loop, and each read holds the loop ~50 ms.
        if self._read_at is None or time.ticks_diff(time.ticks_ms(), self._read_at) >= 1000:
            try:
                self.read()
            except SensorFault as e:
                self._failed(e)
                return None
        return self.deci_watts / 10


def make(w, log, temp):
    # sensors.make: the module on the UART named by the wiring or the config
    hw, board = w.hw, w.board
    uid = w.need("uart")
    pins = board["uarts"].get(str(uid))
    if pins is None:
        raise w.bad("board %s has no UART %r" % (board["id"], uid))
    uart = hw.UART(uid, baudrate=w.get("baud", 9600), bits=8, parity=None, stop=1,
                   tx=hw.Pin(pins["tx"]), rx=hw.Pin(pins["rx"]), timeout=0)
    return Pzem(uart, w.get("addr", 1), w.get("timeout_ms", 200), w.get("retries", 2), log, temp)
