# Entry point: boards run main.py at boot; the Unix port runs
# `micropython main.py CONFIG`.
import meter

meter.main()
