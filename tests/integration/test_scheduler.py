"""The Procfile's scheduler (periodiq) and background worker run a real periodic job."""

from __future__ import annotations

import os
import uuid

import dramatiq
import pytest

from jobs.broker import build_broker
from jobs.executors import InstanceCreateExecutor
from jobs.processes import start_scheduler, start_worker
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.db import session_scope
from resources.models import Instance
from tests.conftest import SQLITE_INTEGRATION_URL
from tests.fixtures import make_instance, make_tenant, reset_database, wait_for

pytestmark = pytest.mark.integration


def test_periodic_pull_refreshes_runtime_state(monkeypatch, tmp_path):
    # Given an OK instance whose stored runtime state has drifted from its backend's
    monkeypatch.setenv("DATABASE_URL", SQLITE_INTEGRATION_URL)
    monkeypatch.setenv("JOBS_NAMESPACE", f"{os.environ['JOBS_NAMESPACE']}-{uuid.uuid4().hex[:6]}")
    monkeypatch.delenv("JOBS_BROKER")
    reset_database()
    cloud = SimulatedCloud()
    cloud.configure(SimulatedConfig(build_ms=0))
    instance = make_instance(make_tenant(), volumes=0)
    InstanceCreateExecutor.execute(instance, is_async=False)
    with session_scope() as session:
        session.get(Instance, instance.id).runtime_state = "drifted"

    # When the scheduler runs with the pull job due every minute (periodiq sends a due job at start)
    previous = dramatiq.get_broker()
    dramatiq.set_broker(build_broker())
    env = {"JOBS_PULL_SCHEDULE": "* * * * *"}
    processes = [
        start_scheduler(env=env, log_path=tmp_path / "scheduler.log"),
        start_worker(
            "background", module="scheduler.app", queues=["background"], env=env, log_path=tmp_path / "background.log"
        ),
    ]
    try:
        # Then the background worker pulls the instance and stores the backend's runtime state
        def refreshed() -> bool:
            with session_scope() as session:
                return session.get(Instance, instance.id).runtime_state == "ACTIVE"

        wait_for(refreshed, timeout_s=150)
    finally:
        for process in processes:
            process.stop()
        dramatiq.set_broker(previous)
        cloud.reset()
