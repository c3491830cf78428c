"""The exception hierarchy shared by every role; rejections carry a stable reason."""

from __future__ import annotations

__all__ = ["GridledgerError", "ConfigError", "Rejected"]


class GridledgerError(Exception):
    """Base of every error gridledger raises on purpose."""


class ConfigError(GridledgerError):
    """A configuration or key file is missing or malformed."""


class Rejected(GridledgerError):
    """Input refused for a machine-readable `reason` (e.g. ``bad_signature``)."""

    def __init__(self, reason: str, detail: str = "", *, meter: str | None = None, seq: int | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.meter = meter
        self.seq = seq
