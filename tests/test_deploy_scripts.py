"""The deploy scripts' safety checks, without starting anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO


def _start_server(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    environ.update({"PREFECT_HOME": str(tmp_path / "home"), **env})
    return subprocess.run(["bash", str(REPO / "deploy" / "start-server.sh"), *args], capture_output=True,
                          text=True, env=environ, timeout=60)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "server.example"])
def test_a_non_loopback_server_needs_an_auth_string(tmp_path: Path, host: str) -> None:
    done = _start_server(tmp_path, PREFECT_SERVER_API_HOST=host)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"refusing to serve on {host} without PREFECT_SERVER_API_AUTH_STRING" in done.stderr
    assert "PREFECT_API_AUTH_STRING" in done.stderr  # says what the workers need
    assert not (tmp_path / "home" / "server.pid").exists()


def test_the_host_cannot_be_passed_around_the_check(tmp_path: Path) -> None:
    done = _start_server(tmp_path, "--host", "0.0.0.0")
    assert done.returncode == 2 and "set PREFECT_SERVER_API_HOST instead" in done.stderr
