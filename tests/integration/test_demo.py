"""``jobs demo`` as a new user runs it: embedded Redis, SQLite, real workers; nothing left running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.integration.conftest import new_user_only

pytestmark = [pytest.mark.integration, new_user_only]


def _processes_mentioning(text: str) -> list[str]:
    return subprocess.run(["pgrep", "-fa", text], capture_output=True, text=True).stdout.splitlines()


def test_demo_on_embedded_defaults(tmp_path):
    private_tmp = tempfile.mkdtemp(prefix="jobs-demo-test-")  # short: it holds the Redis unix socket
    # Given a new user's environment: no REDIS_URL, no DATABASE_URL
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "JOBS_BROKER")}
    env["JOBS_DATA_DIR"] = str(tmp_path)
    # Its embedded Redis makes its directory under TMPDIR: a path only this test's processes mention.
    env["TMPDIR"] = private_tmp

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
    # ... and its private Redis (and workers) are gone
    assert _processes_mentioning(private_tmp) == []
    shutil.rmtree(private_tmp, ignore_errors=True)
