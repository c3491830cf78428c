# Entry point: boards run main.py at boot; the Unix port runs
# `micropython main.py CONFIG`.
import gc
import sys

import provision

provision.boot()  # a board joins its Wi-Fi (config.json, written by flash.sh provision)
# Loaded .mpy code lives in RAM: drop the ~14 KiB of provisioning code before
# the meter loads, which never needs it.
del provision
del sys.modules["provision"]
gc.collect()

import meter  # noqa: E402

meter.main()
