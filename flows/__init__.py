"""Prefect flows: wiring only (parameters, fan-out, artifacts); the work is in ``tasks/`` and ``models/``.

Importing this package turns off Prefect's usage telemetry (nothing here reaches the internet).
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
