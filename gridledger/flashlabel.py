"""A meter's label from its provisioning record: a PNG to print (62 x 29 mm, a
standard address label such as Brother DK-11209, at 300 dpi) with meter id, account, area, key fingerprint and a QR code of the
signed enrollment record, and the same facts as text.

The QR code carries the enrollment transaction exactly as the registry chain
certified it, so a phone scan at the meter gives what anyone can check against
the chain: the meter's public key, and the technician's and the device's
signatures over it.
"""

from __future__ import annotations

from pathlib import Path

import segno
from PIL import Image, ImageDraw, ImageFont

from .flashprovision import fingerprint

__all__ = ["write_label", "qr_payload", "LABEL_PX", "QR_BORDER"]

LABEL_PX = (732, 343)  # 62 x 29 mm at 300 dpi: an enrollment (~650 bytes, QR version 20) at 3 px = 0.25 mm a module
QR_BORDER = 2          # quiet-zone modules (4 is the standard's; the label's white margin adds the rest)
_MARGIN = 12


def qr_payload(record: dict) -> str:
    """What the QR code holds: the certified enrollment transaction."""
    return record["enrollment"]


def _qr_image(payload: str, side: int) -> Image.Image:
    qr = segno.make(payload, error="m", micro=False)
    width = qr.symbol_size(border=QR_BORDER)[0]
    scale = max(1, side // width)
    img = Image.new("1", (width * scale, width * scale), 1)
    px = img.load()
    for y, row in enumerate(qr.matrix_iter(border=QR_BORDER)):
        for x, dark in enumerate(row):
            if dark:
                for dy in range(scale):
                    for dx in range(scale):
                        px[x * scale + dx, y * scale + dy] = 0
    return img


def write_label(record: dict, out: Path) -> tuple[Path, Path]:
    """METER.label.png and METER.label.txt under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    meter, fp = record["meter"], fingerprint(record["public_key"])
    img = Image.new("1", LABEL_PX, 1)
    side = LABEL_PX[1] - 2 * _MARGIN
    qr = _qr_image(qr_payload(record), side)
    img.paste(qr, (LABEL_PX[0] - _MARGIN - qr.width, (LABEL_PX[1] - qr.height) // 2))
    draw = ImageDraw.Draw(img)
    big, small = ImageFont.load_default(size=40), ImageFont.load_default(size=19)
    lines = [(meter, big), (f"account {record['account']}", small), (f"area {record['area']}", small),
             (f"key {fp}", small), (f"{record.get('board', '')}, enrolled by {record.get('signer', '')}", small)]
    y = _MARGIN
    for text, font in lines:
        draw.text((_MARGIN, y), text, font=font, fill=0)
        y += font.size + 8
    png = out / f"{meter}.label.png"
    img.save(png, dpi=(300, 300))
    txt = out / f"{meter}.label.txt"
    reg = record.get("registry", {})
    txt.write_text(f"meter        {meter}\naccount      {record['account']}\narea         {record['area']}\n"
                   f"fingerprint  {fp}\npublic key   {record['public_key']}\nboard        {record.get('board', '')}\n"
                   f"firmware     {record.get('firmware', '')}\ntechnician   {record.get('signer', '')}\n"
                   f"registry     {reg.get('status', '')} at height {reg.get('height', '')}\n"
                   f"qr           {qr_payload(record)}\n")
    return png, txt
