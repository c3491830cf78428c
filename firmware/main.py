# Entry point: boards run main.py at boot; the Unix port runs
# `micropython main.py CONFIG`.
import meter
import provision

provision.boot()  # a board joins its Wi-Fi (config.json, written by flash.sh provision)
meter.main()
