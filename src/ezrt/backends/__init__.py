"""Backends: one module per runtime, each behind the small protocol in :mod:`.base`."""
