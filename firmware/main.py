# Entry point: boards run main.py at boot; the Unix port runs
# `micropython main.py CONFIG`.
import netup

netup.boot()  # a board joins its Wi-Fi (config.json, written by flash.sh provision)

import meter  # noqa: E402

meter.main()
