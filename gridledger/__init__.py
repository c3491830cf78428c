"""gridledger: shared primitives (wire format, keys, transport) and the one CLI for every role."""

__version__ = "0.1.0"
