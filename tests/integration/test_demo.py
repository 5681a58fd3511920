"""``jobs demo`` as a new user runs it: embedded Redis, SQLite, real workers; nothing left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _redis_servers() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "jobs-redis-"], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


def test_demo_on_embedded_defaults(tmp_path):
    # Given a new user's environment: no REDIS_URL, no DATABASE_URL
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "JOBS_BROKER")}
    env["JOBS_DATA_DIR"] = str(tmp_path)
    before = _redis_servers()

    # When the demo runs with a high failure rate
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs",
            "demo",
            "--json",
            "--instances",
            "6",
            "--tenants",
            "2",
            "--failure-rate",
            "0.3",
            "--seed",
            "11",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    # Then it succeeds, every outcome was the expected one, failures show readable errors
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["unexpected"] == 0
    assert set(summary) >= {"resources", "operations", "unexpected", "duration_s"}
    assert sum(c["succeeded"] + c["failed"] for c in summary["operations"].values()) >= 12
    assert summary["failures"], "a 30% failure rate should fail something"
    assert all("simulated cloud" in f["error"] or "runtime state" in f["error"] for f in summary["failures"])
    assert (tmp_path / "jobs.sqlite3").exists()
    # ... and its private Redis is gone
    assert _redis_servers() <= before
