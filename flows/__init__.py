"""Prefect flows: wiring only (parameters, fan-out, artifacts); the work is in ``tasks/`` and ``models/``.

Importing this package turns off Prefect's usage telemetry (nothing here reaches the internet) and
gives Prefect's temporary local server two minutes to start: its default of 20 s is too short for a
fresh database on a busy 2-core machine (a newcomer's first ``make demo`` failed so).
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
