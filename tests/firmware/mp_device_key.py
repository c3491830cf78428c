# Under MicroPython, standing in for a provisioned board: make the Ed25519 key on
# the "device" (its seed never leaves DIR), or sign the enrollment bytes with it.
#   keygen DIR          -> public key, hex
#   sign DIR MSGFILE    -> signature over the file's bytes, hex
import sys
import os
import binascii
import ed25519

cmd, folder = sys.argv[1], sys.argv[2]
path = folder + "/ed25519.key"
if cmd == "keygen":
    seed = os.urandom(32)
    with open(path, "wb") as f:
        f.write(seed)
else:
    with open(path, "rb") as f:
        seed = f.read()
key = ed25519.SigningKey(seed)
if cmd == "keygen":
    print(binascii.hexlify(key.public).decode())
else:
    with open(sys.argv[3], "rb") as f:
        print(binascii.hexlify(key.sign(f.read())).decode())
