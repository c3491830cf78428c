# The RP2040's on-chip temperature sensor (ADC input 4): the board's own
# temperature, for the "device temperature" every driver reports. Datasheet
# section 4.9.5: T = 27 - (V - 0.706) / 0.001721, about +-2 degC after the
# board's self-heating; it reads the chip, not the enclosure's air.


class DieTemp:
    def __init__(self, adc, vref):
        self._adc = adc
        self._volts_per_count = vref / 65535

    def read_c(self):
        v = self._adc.read_u16() * self._volts_per_count
        return 27 - (v - 0.706) / 0.001721
