"""Gateway-side roles: ingest of meter readings (today), validators, storage and verifier (later issues)."""
