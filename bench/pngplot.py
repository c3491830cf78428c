"""A line plot as a PNG with nothing but zlib: for benches run where matplotlib is not
installed (it is the `bench` extra). Series as polylines, events as vertical lines,
light grid lines at round values; no text (the bench's JSON and docs carry the numbers)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Sequence

__all__ = ["line_png"]

W, H, PAD = 800, 400, 30
WHITE, GREY, BLACK = (255, 255, 255), (225, 225, 225), (0, 0, 0)


def _png(width: int, height: int, rows: list[bytearray]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def line_png(path: Path, xs: Sequence[float], series: dict[tuple[int, int, int], Sequence[float]],
             events: dict[tuple[int, int, int], float]) -> None:
    """`series`: colour -> ys over `xs`; `events`: colour -> x of a vertical line."""
    rows = [bytearray(WHITE * W) for _ in range(H)]

    def put(x: int, y: int, c) -> None:
        if 0 <= x < W and 0 <= y < H:
            rows[y][3 * x:3 * x + 3] = bytes(c)

    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    top = max((max(ys) for ys in series.values() if ys), default=1) or 1
    px = lambda x: PAD + int((x - x0) / (x1 - x0) * (W - 2 * PAD))          # noqa: E731
    py = lambda y: H - PAD - int(y / top * (H - 2 * PAD))                     # noqa: E731
    for k in range(1, 5):                                                      # grid at quarters of the top
        for x in range(PAD, W - PAD):
            put(x, py(top * k / 4), GREY)
    for x in range(PAD, W - PAD):
        put(x, H - PAD, BLACK)
    for y in range(PAD, H - PAD):
        put(PAD, y, BLACK)
    for colour, x in events.items():
        for y in range(PAD, H - PAD):
            if y % 6 < 4:
                put(px(x), y, colour)
    for colour, ys in series.items():
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            n = max(abs(bx - ax), abs(by - ay), 1)
            for i in range(n + 1):
                x, y = ax + (bx - ax) * i // n, ay + (by - ay) * i // n
                for d in (-1, 0, 1):
                    put(x, y + d, colour)
    Path(path).write_bytes(_png(W, H, rows))
