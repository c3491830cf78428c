"""Coordinator-side roles: registry, settlement, trustees and the API (later issues); today, decrypted totals for the testbed."""
