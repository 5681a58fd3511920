"""Metrics through a real ``dramatiq`` worker process: one scrape of its endpoint returns Dramatiq's own
metrics and ours, recorded by its worker process and read at scrape time by its exposition process."""

from __future__ import annotations

import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import dramatiq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs.broker import build_broker
from jobs.executors import InstanceCreateExecutor
from jobs.processes import ManagedProcess, start_worker
from middleware import Deduplicate
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.db import session_scope
from resources.models import Operation
from resources.redis_client import get_redis
from resources.states import State
from scheduler.janitor import janitor
from scheduler.pull import pull_resource
from tests.conftest import SQLITE_INTEGRATION_URL
from tests.fixtures import make_instance, make_tenant, reset_database, wait_for
from tests.unit.test_janitor import stuck_instance

pytestmark = pytest.mark.integration

LIMIT_OPTION = "max_concurrent_provision_instance"
CREATE = InstanceCreateExecutor.executor_name()

#: (sample name, labels it must have, least value) that the scrape must show once the run is over.
Expectation = tuple[str, dict[str, str], float]


@dataclass
class Metered:
    port: int
    broker: dramatiq.Broker
    worker: ManagedProcess
    log_path: Path

    def text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return response.read().decode()

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Every sample of one scrape, by sample name."""
        text = self.text()
        found: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append((sample.labels, sample.value))
        return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def metered(monkeypatch, tmp_path) -> Iterator[Metered]:
    """One worker process serving every queue, with metrics on a free port; SQLite shared with this process."""
    monkeypatch.setenv("DATABASE_URL", SQLITE_INTEGRATION_URL)
    monkeypatch.setenv("JOBS_NAMESPACE", f"{os.environ['JOBS_NAMESPACE']}-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("JOBS_POLL_INTERVAL_S", "0.05")
    monkeypatch.delenv("JOBS_BROKER")
    monkeypatch.delenv("JOBS_METRICS", raising=False)  # this process only sends
    reset_database()
    cloud = SimulatedCloud()
    # Every volume's create is refused: an instance with a volume fails, one without succeeds.
    cloud.configure(SimulatedConfig(build_ms=50, delete_ms=20, failures={"volume.create": 1.0}))
    previous = dramatiq.get_broker()
    broker = build_broker()
    dramatiq.set_broker(broker)
    port = _free_port()
    log_path = tmp_path / "worker.log"
    worker = start_worker(
        "metered",
        module="scheduler.app",  # the executors' steps and the background jobs
        queues=["default", "heavy", "background"],
        threads=4,
        env={
            "JOBS_METRICS": "1",
            "dramatiq_prom_host": "127.0.0.1",
            "dramatiq_prom_port": str(port),
            "dramatiq_prom_db": str(tmp_path / "prometheus"),
        },
        log_path=log_path,
    )
    try:
        yield Metered(port, broker, worker, log_path)
    finally:
        worker.stop()
        dramatiq.set_broker(previous)
        cloud.reset()


def _unmet(scrape: dict[str, list[tuple[dict[str, str], float]]], expected: list[Expectation]) -> list[Expectation]:
    return [
        (name, labels, least)
        for name, labels, least in expected
        if not any(labels.items() <= found.items() and value >= least for found, value in scrape.get(name, []))
    ]


def _ended(operation_ids: list[str]) -> bool:
    with session_scope() as session:
        return all(session.get_one(Operation, op).status != "running" for op in operation_ids)


def test_one_scrape_shows_dramatiqs_metrics_and_ours(metered):
    # Given a tenant allowing one provisioning at a time, and another tenant
    throttled, other = make_tenant("throttled", options={LIMIT_OPTION: 1}), make_tenant("other")
    scope = f"provision:instance:{throttled.uuid}"

    # When two creates share the throttled tenant's slot (the second waits for a hand-off), one create fails,
    handles = [InstanceCreateExecutor.execute(make_instance(throttled, f"vm{i}", volumes=0)) for i in range(2)]
    handles.append(InstanceCreateExecutor.execute(make_instance(other, "refused-volume", volumes=1)))
    # ... a resource stuck since long ago waits for the janitor, which runs,
    stuck_instance(State.CREATING, operation_age=timedelta(hours=4))
    metered.broker.enqueue(janitor.message())
    # ... and a background job reaches the worker while an equal one holds its guard (sent by a broker that
    # does not declare the job, so nothing stops it before the worker does)
    duplicate = pull_resource.message("instance:0")
    guard = Deduplicate().key_of(pull_resource.broker, duplicate)
    assert guard is not None
    get_redis().set(guard, "an-equal-job", px=60_000)
    metered.broker.enqueue(duplicate)

    # Then, scraped while and after they run, the endpoint shows every metric with its labels
    expected: list[Expectation] = [
        ("dramatiq_messages_total", {"queue_name": "default"}, 1),
        ("dramatiq_message_duration_milliseconds_count", {"queue_name": "background", "actor_name": "janitor"}, 1),
        ("jobs_operations_total", {"executor": CREATE, "outcome": "succeeded"}, 2),
        ("jobs_operations_total", {"executor": CREATE, "outcome": "failed"}, 1),
        ("jobs_operations_total", {"executor": "test", "outcome": "failed"}, 1),  # ended by the janitor
        ("jobs_operation_duration_seconds_count", {"executor": CREATE, "outcome": "succeeded"}, 2),
        ("jobs_operation_duration_seconds_bucket", {"executor": CREATE, "outcome": "failed", "le": "+Inf"}, 1),
        ("jobs_transitions_total", {"resource_type": "instance", "transition": "begin_creating"}, 2),
        ("jobs_transitions_total", {"resource_type": "instance", "transition": "set_erred"}, 1),
        ("jobs_throttle_handoff_latency_seconds_count", {}, 1),
        ("jobs_throttle_holders", {"scope": scope}, 0),
        ("jobs_throttle_waiters", {"scope": scope}, 0),
        ("jobs_throttle_limit", {"scope": scope}, 1),
        ("jobs_dedup_skips_total", {"job": "pull_resource", "stage": "run"}, 1),
        ("jobs_janitor_rescues_total", {"state": "CREATING"}, 1),
        ("jobs_outbox_backlog", {}, 0),
        ("jobs_outbox_relayed_total", {}, 0),
        ("jobs_metrics_source_up", {"source": "redis"}, 1),
        ("jobs_metrics_source_up", {"source": "database"}, 1),
    ]
    scrapes: list[dict] = []

    def all_shown() -> bool:
        scrapes.append(metered.scrape())
        return _ended([h.id for h in handles]) and not _unmet(scrapes[-1], expected)

    try:
        wait_for(all_shown, timeout_s=30)
    except AssertionError:
        last = scrapes[-1] if scrapes else {}
        log = metered.log_path.read_text(errors="replace")[-3000:]
        raise AssertionError(f"not shown: {_unmet(last, expected)}\nworker log:\n{log}") from None

    # ... and the last scrape reflects the end of the run: no one holds or waits for the throttled scope
    final = metered.scrape()
    assert [v for labels, v in final["jobs_throttle_holders"] if labels == {"scope": scope}] == [0]
    assert [v for labels, v in final["jobs_throttle_waiters"] if labels == {"scope": scope}] == [0]
    assert [h.status() for h in handles] == ["succeeded", "succeeded", "failed"]
    assert "# TYPE jobs_operations_running gauge" in metered.text()  # no sample: nothing is running
