"""The journal at its default size (2,880 readings, 30 days of 15-minute intervals) fits
every board's filesystem, checked on a real littlefs (MicroPython's VfsLfs2, formatted at
the size the board profile in hardware/boards gives, in RAM) holding the mpy-cross bundle
too, in the worst case (capacity waiting and the oldest segment all but one acknowledged).
The readings as journaled before compact records (674 bytes) do not fit a Pico W."""

from __future__ import annotations

import json

import pytest

from gridledger.firmware_build import BOARDS

from conftest import MP_SCRIPTS

CAPACITY = 2880  # the journal's default (firmware/meterstate.py)


def fit(mp_source, firmware_bundle, tmp_path, board: str, record: str) -> dict:
    profile = json.loads((BOARDS / f"{board}.json").read_text())
    job = tmp_path / f"{board}-{record}.json"
    job.write_text(json.dumps({"fs_bytes": profile["fs_bytes"], "progsize": 256 if profile["platform"] == "rp2" else 32,
                               "bundle": str(firmware_bundle), "record": record, "capacity": CAPACITY}))
    return mp_source.run_json(MP_SCRIPTS / "mp_lfs_fit.py", job, heap="4m", timeout=600)


@pytest.mark.parametrize("board", ["pico-w", "pico", "esp32-devkitc"])
def test_thirty_days_of_compact_readings_fit_the_board(mp_source, firmware_bundle, tmp_path, board):
    """2,880 waiting + 359 acknowledged-but-not-yet-deleted compact readings, the bundle, config,
    key and counters: every append succeeds and the journal reports itself full, not the flash."""
    out = fit(mp_source, firmware_bundle, tmp_path, board, "compact")
    print(board, json.dumps(out))  # for docs/journal.md, with -s
    assert out["record_bytes"] <= 190
    assert out["ok"] and out["live"] == CAPACITY and out["full"] and out["dropped"] == 0, out
    assert out["on_flash"] == CAPACITY + out["per_segment"] - 1
    assert out["free_blocks"] >= 2, out  # littlefs's copy-on-write needs room for the next append


def test_full_size_readings_do_not_fit_a_pico_w(mp_source, firmware_bundle, tmp_path):
    """Before: at 674 bytes a reading, the Pico W's flash runs out first: the write fails
    (counted as dropped) long before 2,880 readings wait."""
    out = fit(mp_source, firmware_bundle, tmp_path, "pico-w", "full")
    print("pico-w full", json.dumps(out))
    assert out["record_bytes"] == 674
    assert not out["ok"] and out["dropped"] >= 1 and out["live"] < 1200, out
