"""Peer implementations that run in their own process and write a JSON (see each module)."""
