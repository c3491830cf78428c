# Fake peripherals for driver tests under the Unix port, shaped like MicroPython's
# machine module (Pin, UART, ADC, WDT): scripted by the test, recording what the
# driver did. Only pure logic is tested against them; the wiring is not.
import math
import time


class Clock:
    # Stands in for time.ticks_ms where a test needs to control time.
    def __init__(self, ms=0):
        self.ms = ms

    def ticks(self):
        return self.ms


class UsClock:
    # A microsecond clock for sampling tests, independent of how busy the host
    # is: each look at it takes `per_call` us, each ADC conversion `per_read` us;
    # stall_at: {call number: us} freezes the "CPU" once, like an interrupt.
    def __init__(self, per_call=3, per_read=4, stall_at=None):
        self.now = 1000
        self.per_call = per_call
        self.per_read = per_read
        self.calls = 0
        self.stall_at = stall_at or {}

    def ticks(self):
        self.calls += 1
        self.now += self.per_call + self.stall_at.get(self.calls, 0)
        return self.now


class Pin:
    IN = 0
    OUT = 1
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 4
    IRQ_RISING = 8
    made = []

    def __init__(self, id, mode=None, pull=None, level=1):
        self.id = id
        self.mode = mode
        self.pull = pull
        self.level = level
        self.handler = None
        self.trigger = None
        self.hard = None
        Pin.made.append(self)

    def value(self):
        return self.level

    def irq(self, trigger=None, handler=None, hard=False):
        self.trigger = trigger
        self.handler = handler
        self.hard = hard

    def drive(self, level):
        # An edge on the wire: the IRQ fires if the level changed.
        if level != self.level:
            self.level = level
            if self.handler is not None:
                self.handler(self)


class SoftPin(Pin):
    # A port whose pin IRQs are always scheduled (ESP32): irq() has no `hard`.
    def irq(self, trigger=None, handler=None):
        Pin.irq(self, trigger, handler, None)


class PulseCounter:
    # machine.Counter (an ESP32 PCNT unit): a 16-bit signed hardware count the
    # test moves. Not named Counter here: fakehw as a whole stands for an
    # RP2040, which has none.
    RISING = 1
    FALLING = 2
    made = []

    def __init__(self, id, src, edge=RISING, filter_ns=0):
        self.id = id
        self.src = src
        self.edge = edge
        self.filter_ns = filter_ns
        self.n = 32000  # near the top: the first pulses wrap it
        PulseCounter.made.append(self)

    def pulses(self, k):
        self.n += k

    def value(self):
        return (self.n + 32768) % 65536 - 32768


class UART:
    # Each write() of a request queues the next scripted answer (bytes, or None
    # for silence); reads hand it out at most `chunk` bytes at a time.
    made = []

    def __init__(self, id, **kw):
        self.id = id
        self.kw = kw
        self.answers = []
        self.writes = []
        self.rx = b""
        self.chunk = 7
        UART.made.append(self)

    def write(self, data):
        self.writes.append(bytes(data))
        if self.answers:
            a = self.answers.pop(0)
            if a is not None:
                self.rx += a
        return len(data)

    def any(self):
        return len(self.rx)

    def read(self, n=None):
        n = len(self.rx) if n is None else n
        out, self.rx = self.rx[:n], self.rx[n:]
        return out

    def readinto(self, buf):
        n = min(len(buf), len(self.rx), self.chunk)
        buf[:n] = self.rx[:n]
        self.rx = self.rx[n:]
        return n


class Lcg:
    # Deterministic noise on every port: a 31-bit LCG, Irwin-Hall approximation
    # of a unit normal from 12 uniforms.
    def __init__(self, seed):
        self.x = seed

    def uniform(self):
        self.x = (self.x * 1103515245 + 12345) & 0x7FFFFFFF
        return self.x / 2147483648

    def normal(self):
        s = 0.0
        for _ in range(12):
            s += self.uniform()
        return s - 6.0


class ADC:
    # A 12-bit ADC (vref 3.3 V) reading signal(t_seconds) volts at the moment
    # of the read, plus Gaussian noise of `noise` LSB; read_u16 scales like
    # the RP2040 port: (raw << 4) | (raw >> 8).
    ATTN_11DB = 3
    made = []

    def __init__(self, src, signal=None, noise=0.0, seed=1, clock=None):
        self.src = src
        # Default: mid-rail, or 0.706 V on input 4 (the RP2040's sensor at 27 degC)
        level = 0.706 if src == 4 else 1.65
        self.signal = signal or (lambda t: level)
        self.noise = noise
        self.rng = Lcg(seed)
        self.atten_set = None
        self.reads = 0
        self.clock = clock
        ADC.made.append(self)

    def atten(self, a):
        self.atten_set = a

    def read_u16(self):
        self.reads += 1
        c = self.clock
        if c is None:
            t = time.ticks_us()
        else:
            c.now += c.per_read
            t = c.now
        v = self.signal(t / 1000000)
        raw = int(v / 3.3 * 4096 + self.noise * self.rng.normal() + 0.5)
        raw = 0 if raw < 0 else 4095 if raw > 4095 else raw
        return (raw << 4) | (raw >> 8)


def sine(bias, peak, hz=50.0, phase=0.0):
    w = 2 * math.pi * hz
    return lambda t: bias + peak * math.sin(w * t + phase)


class WDT:
    made = []

    def __init__(self, timeout=None):
        self.timeout = timeout
        self.feeds = 0
        WDT.made.append(self)

    def feed(self):
        self.feeds += 1


class Esp32:
    # The machine module of an ESP32 firmware that has machine.Counter
    Pin = SoftPin
    UART = UART
    ADC = ADC
    Counter = PulseCounter

