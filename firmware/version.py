# The firmware's version, reported in the meter's health message.
FIRMWARE = "0.3.0"
