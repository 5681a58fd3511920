"""``python -m jobs status``, ``explain`` and ``dead-letters`` run as the commands they are, against a live
system: a real worker process, three creates in a tenant that allows one at a time (one builds for a
minute, two wait), and a volume create whose step failed for good and was dead-lettered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from sqlalchemy import select

from jobs.broker import build_broker
from jobs.dead_letters import QueueKeys
from jobs.executors import InstanceCreateExecutor, VolumeCreateExecutor
from jobs.processes import start_worker
from middleware import Throttle, find_inflight
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.db import session_scope
from resources.models import Instance, Operation, ServiceSettings, Volume
from resources.states import State
from tests.conftest import SQLITE_INTEGRATION_URL
from tests.fixtures import make_instance, make_tenant, reset_database, wait_for
from tests.integration.conftest import on_rabbitmq, redis_broker_only

pytestmark = pytest.mark.integration

LIMIT_OPTION = "max_concurrent_provision_instance"


@pytest.fixture
def live(monkeypatch, tmp_path) -> Iterator[Any]:
    """One real worker on the real Redis and a SQLite database shared with this process; builds take a
    minute and every volume create fails."""
    monkeypatch.setenv("DATABASE_URL", SQLITE_INTEGRATION_URL)
    monkeypatch.setenv("JOBS_NAMESPACE", f"{os.environ['JOBS_NAMESPACE']}-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("JOBS_POLL_INTERVAL_S", "0.2")
    monkeypatch.delenv("JOBS_BROKER")
    reset_database()
    cloud = SimulatedCloud()
    cloud.configure(SimulatedConfig(build_ms=60_000, failures={"volume.create": 1.0}))
    previous = dramatiq.get_broker()
    broker = build_broker()
    dramatiq.set_broker(broker)
    worker = start_worker("worker", queues=["default"], threads=4, log_path=tmp_path / "worker.log")
    try:
        yield broker  # type: ignore[misc]
    finally:
        worker.stop()
        dramatiq.set_broker(previous)
        cloud.reset()


def _volume(tenant: ServiceSettings) -> Volume:
    with session_scope() as session:
        volume = Volume(name="doomed", size_gb=10, service_settings_id=tenant.id)
        session.add(volume)
    return volume


def _state(model: type[Instance] | type[Volume], uuid_: str) -> State | None:
    with session_scope() as session:
        return session.scalar(select(model.state).where(model.uuid == uuid_))


def _status_of(operation_id: str) -> str | None:
    with session_scope() as session:
        return session.scalar(select(Operation.status).where(Operation.id == operation_id))


def _jobs(*commands: list[str]) -> list[tuple[int, Any, str]]:
    """Run ``python -m jobs <command>`` for each command at once; (exit code, JSON printed, stderr) each."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "jobs", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ
        )
        for command in commands
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        results.append((process.returncode, json.loads(out) if out.strip() else None, err.decode()))
    return results


@redis_broker_only  # it reads the Redis broker's keys to know when the system is in the state it describes
def test_status_explain_and_dead_letters_on_a_live_system(live):
    # Given three creates in a tenant that allows one at a time, and a volume create that fails for good
    tenant = make_tenant("throttled", options={LIMIT_OPTION: 1})
    instances = [make_instance(tenant, f"vm-{i}", volumes=0) for i in range(3)]
    handles = [InstanceCreateExecutor.execute(instance) for instance in instances]
    doomed = VolumeCreateExecutor.execute(_volume(make_tenant("doomed")))
    scope = f"provision:instance:{tenant.uuid}"
    store = Throttle().store
    keys = QueueKeys(live.namespace, "default")
    wait_for(
        lambda: (
            _state(Instance, instances[0].uuid) == State.CREATING
            and store.state_of(handles[0].id) == "holding"
            and _state(Volume, doomed.resource_ref.split(":")[1]) == State.ERRED
            and live.client.zcard(keys.dead) == 1
        ),
        timeout_s=30,
    )

    # When the status, the scope and the dead letters are asked for while they are in flight
    (status_rc, status, status_err), (explain_rc, explained, explain_err), (dead_rc, dead, dead_err) = _jobs(
        ["status", "--json"], ["explain", scope, "--json"], ["dead-letters", "--json"]
    )
    assert (status_rc, explain_rc, dead_rc) == (0, 0, 0), status_err + explain_err + dead_err

    # Then the status shows the resources, the three operations in flight (oldest first), the queues
    assert status["resources"] == {
        "instance": {"CREATING": 1, "CREATION_SCHEDULED": 2},
        "volume": {"ERRED": 1},
    }
    in_flight = status["operations_in_flight"]
    assert in_flight["count"] == 3
    assert [o["id"] for o in in_flight["oldest"]] == [h.id for h in handles]
    assert {o["executor"] for o in in_flight["oldest"]} == {"InstanceCreateExecutor"}
    assert all(o["age_s"] > 0 and o["resource_ref"].startswith("instance:") for o in in_flight["oldest"])
    assert set(status["queues"]) == {"background", "default", "heavy"}
    default = status["queues"]["default"]
    assert set(default) == {"ready", "delayed", "dead_lettered", "in_progress"}
    assert default["dead_lettered"] == 1
    # ... the building instance's poll is somewhere: queued, delayed or being run
    assert default["ready"] + default["delayed"] + default["in_progress"] >= 1
    # ... the scope with its holder, its two waiters and how long the first has waited
    (entry,) = [s for s in status["throttle"] if s["scope"] == scope]
    assert (entry["limit"], entry["holders"], entry["waiters"]) == (1, 1, 2)
    assert entry["oldest_wait_s"] > 0
    # ... and the scheduler: none runs here, its jobs' next runs are known
    assert (status["scheduler"]["leader"], status["scheduler"]["lease_expires_in_s"]) == (None, None)
    assert {j["name"] for j in status["scheduler"]["jobs"]} >= {"janitor", "pull_resources"}
    assert all(j["next_run"] for j in status["scheduler"]["jobs"])

    # Then explain names the holder and the waiters, first in line first
    assert explained["limit"] == 1
    assert [(h["operation_id"], h["state"]) for h in explained["holders"]] == [(handles[0].id, "holding")]
    assert [w["operation_id"] for w in explained["waiters"]] == [handles[1].id, handles[2].id]
    assert explained["waiting"] == 2

    # Then the dead letter is listed with the error its operation failed with
    assert dead["total"] == 1 and dead["counts"]["default"] == 1
    (letter,) = dead["dead_letters"]
    assert (letter["actor"], letter["operation_id"], letter["operation_status"]) == (
        "backend_method",
        doomed.id,
        "failed",
    )
    assert letter["error_source"] == "operation"
    assert "simulated cloud refused volume.create" in letter["error"]
    assert "BackendError" in letter["traceback"]

    # When it is requeued
    ((requeue_rc, requeued, requeue_err),) = _jobs(["dead-letters", "requeue", letter["id"], "--json"])

    # Then the command says the worker will skip it, its operation having failed
    assert requeue_rc == 0, requeue_err
    assert requeued["requeued"] == 1
    (result,) = requeued["results"]
    assert (result["outcome"], result["operation_id"]) == ("requeued", doomed.id)
    assert "already failed: a worker will skip this step" in result["detail"]
    # ... it left the dead letters, and the worker took it and acknowledged it (its copy is forgotten)
    inflight = find_inflight(live)
    wait_for(
        lambda: (
            live.client.zcard(keys.dead) == 0
            and not live.client.hexists(keys.bodies, letter["id"])
            and not inflight.copies(doomed.id)
        ),
        timeout_s=15,
    )
    # ... without reviving the operation
    assert _status_of(doomed.id) == "failed"
    assert _status_of(handles[0].id) == "running"


@pytest.mark.skipif(not on_rabbitmq(), reason="RabbitMQ's dead-letter queues; set BROKER_URL=amqp://… to run it")
def test_dead_letters_on_rabbitmq_are_listed_without_being_taken_and_requeued(live):
    # Given a volume create whose step failed for good, on RabbitMQ
    doomed = VolumeCreateExecutor.execute(_volume(make_tenant("doomed")))
    wait_for(
        lambda: (
            _state(Volume, doomed.resource_ref.split(":")[1]) == State.ERRED
            and live.get_queue_message_counts("default")[2] == 1
        ),
        timeout_s=30,
    )

    # When the dead letters and the status are asked for
    (dead_rc, dead, dead_err), (status_rc, status, status_err) = _jobs(["dead-letters", "--json"], ["status", "--json"])

    # Then the dead letter is listed with the error its operation failed with, and is still dead-lettered
    assert (dead_rc, status_rc) == (0, 0), dead_err + status_err
    assert dead["total"] == 1 and dead["counts"]["default"] == 1
    (letter,) = dead["dead_letters"]
    assert (letter["actor"], letter["operation_id"], letter["operation_status"], letter["error_source"]) == (
        "backend_method",
        doomed.id,
        "failed",
        "operation",
    )
    assert "simulated cloud refused volume.create" in letter["error"]
    assert letter["age_s"] >= 0
    assert status["queues"]["default"]["dead_lettered"] == 1
    wait_for(lambda: live.get_queue_message_counts("default")[2] == 1, timeout_s=10)

    # When an unknown id is requeued with it
    ((unknown_rc, _out, unknown_err),) = _jobs(["dead-letters", "requeue", letter["id"], "no-such-id"])

    # Then nothing is requeued, and the error names the id
    assert unknown_rc == 1 and "no-such-id" in unknown_err
    wait_for(lambda: live.get_queue_message_counts("default")[2] == 1, timeout_s=10)

    # When it is requeued
    ((requeue_rc, requeued, requeue_err),) = _jobs(["dead-letters", "requeue", letter["id"], "--json"])

    # Then the command says the worker will skip it, its operation having failed; it leaves the dead-letter
    # queue, and the worker takes it (nothing is left ready) without reviving the operation
    assert requeue_rc == 0, requeue_err
    (result,) = requeued["results"]
    assert (result["outcome"], result["operation_id"]) == ("requeued", doomed.id)
    assert "already failed: a worker will skip this step" in result["detail"]
    wait_for(lambda: live.get_queue_message_counts("default")[:3:2] == (0, 0), timeout_s=15)
    assert _status_of(doomed.id) == "failed"
