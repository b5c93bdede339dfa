"""Shared schemas and Redis names: what the gateway and the worker agree on. No I/O here."""
