"""Prefect flows: wiring, parameters, fan-out and artifacts only (no numerics here)."""
