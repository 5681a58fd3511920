"""Metrics: each counter and histogram moves when its event happens, the collector reads shared state at
scrape time, and worker processes write their metrics where the exposition server reads them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from dramatiq import Message
from prometheus_client import generate_latest
from sqlalchemy import update

from jobs.broker import build_broker
from jobs.executors import InstanceCreateExecutor
from middleware import Throttle, ThrottleScope
from middleware.metrics import JobsCollector, JobsPrometheus, exposition_registry, serve_metrics
from middleware.outbox import relay, stage
from middleware.progress import Outgoing
from resources.backends import SimulatedConfig
from resources.db import session_scope
from resources.metrics import get_metrics
from resources.models import Operation, OutboxMessage, utcnow
from resources.states import State
from resources.transitions import apply_transition
from scheduler.background import background_job
from scheduler.janitor import sweep
from tests.fixtures import drain, make_instance, make_tenant
from tests.unit.test_janitor import stuck_instance

LIMIT_OPTION = "max_concurrent_provision_instance"
CREATE = InstanceCreateExecutor.executor_name()


@background_job
def metrics_probe_job(ref: str) -> None:
    pass


def value(name: str, **labels: str) -> float:
    return get_metrics().registry.get_sample_value(name, labels) or 0.0


def samples(families: Iterator, name: str) -> dict[tuple[str, ...], float]:
    family = next(f for f in families if f.name == name)
    return {tuple(s.labels.values()): s.value for s in family.samples}


def test_operations_are_counted_by_executor_and_outcome_with_their_durations(stub_broker, stub_worker, cloud):
    before = {o: value("jobs_operations_total", executor=CREATE, outcome=o) for o in ("succeeded", "failed")}
    timed = value("jobs_operation_duration_seconds_count", executor=CREATE, outcome="succeeded")
    seconds = value("jobs_operation_duration_seconds_sum", executor=CREATE, outcome="succeeded")

    # When one create succeeds, and then one fails (its backend refuses)
    tenant = make_tenant()
    InstanceCreateExecutor.execute(make_instance(tenant, "ok", volumes=0))
    drain(stub_broker)
    cloud.configure(SimulatedConfig(build_ms=40, delete_ms=20, failures={"instance.create": 1.0}))
    InstanceCreateExecutor.execute(make_instance(tenant, "refused", volumes=0))
    drain(stub_broker)

    # Then each outcome counted once, and the success's duration (the build takes 40 ms) was observed
    assert value("jobs_operations_total", executor=CREATE, outcome="succeeded") == before["succeeded"] + 1
    assert value("jobs_operations_total", executor=CREATE, outcome="failed") == before["failed"] + 1
    assert value("jobs_operation_duration_seconds_count", executor=CREATE, outcome="succeeded") == timed + 1
    assert value("jobs_operation_duration_seconds_sum", executor=CREATE, outcome="succeeded") - seconds >= 0.04


def test_a_transition_counts_when_its_transaction_commits_and_not_when_it_rolls_back(stub_broker):
    instance = make_instance(make_tenant(), volumes=0)
    before = value("jobs_transitions_total", resource_type="instance", transition="set_erred")

    with session_scope() as session:
        assert apply_transition(session, instance.ref, "set_erred")
        session.rollback()
    assert value("jobs_transitions_total", resource_type="instance", transition="set_erred") == before

    with session_scope() as session:
        assert apply_transition(session, instance.ref, "set_erred")
        assert value("jobs_transitions_total", resource_type="instance", transition="set_erred") == before
    assert value("jobs_transitions_total", resource_type="instance", transition="set_erred") == before + 1


def test_a_skipped_duplicate_job_is_counted_by_job_and_stage(stub_broker):
    before = value("jobs_dedup_skips_total", job="metrics_probe_job", stage="enqueue")
    assert metrics_probe_job.send("x") is not None
    assert metrics_probe_job.send("x") is None
    assert value("jobs_dedup_skips_total", job="metrics_probe_job", stage="enqueue") == before + 1


def test_a_janitor_rescue_is_counted_by_the_state_it_was_stuck_in(stub_broker):
    stuck_instance(State.UPDATING, operation_age=timedelta(hours=4))
    before = value("jobs_janitor_rescues_total", state="UPDATING")
    failed = value("jobs_operations_total", executor="test", outcome="failed")

    assert len(sweep(stub_broker)) == 1

    assert value("jobs_janitor_rescues_total", state="UPDATING") == before + 1
    assert value("jobs_operations_total", executor="test", outcome="failed") == failed + 1  # ended by it


def test_rows_sent_by_the_outbox_relay_are_counted(stub_broker):
    before = value("jobs_outbox_relayed_total")
    with session_scope() as session:
        stage(session, "op-left-behind", [Outgoing(Message("default", "x", (), {}, {}))])
    assert relay(stub_broker, older_than_s=0) == 1
    assert value("jobs_outbox_relayed_total") == before + 1


def test_a_throttle_hand_off_observes_its_latency_once(stub_broker, stub_worker, cloud):
    # Given a tenant allowing one provisioning at a time
    tenant = make_tenant(options={LIMIT_OPTION: 1})
    handoffs = value("jobs_throttle_handoff_latency_seconds_count")

    # When two creates run: the second waits, and the first's release hands it the slot
    for name in ("first", "second"):
        InstanceCreateExecutor.execute(make_instance(tenant, name, volumes=0))
    drain(stub_broker)

    # Then one hand-off was measured (the first operation's admission was no hand-off)
    assert value("jobs_throttle_handoff_latency_seconds_count") == handoffs + 1
    assert value("jobs_throttle_handoff_latency_seconds_bucket", le="+Inf") >= 1


def test_the_collector_reads_throttle_outbox_and_operations_at_scrape_time(stub_broker):
    # Given a scope whose one slot is held with one operation waiting, an old outbox row, a running operation whose
    # first steps are not known sent
    throttle = Throttle()
    scope = ThrottleScope(f"metrics-test:{uuid.uuid4().hex[:8]}", 1)
    assert throttle.store.acquire("op-holding", [scope], start=True).status == "granted"
    assert throttle.store.acquire("op-waiting", [scope], start=True).status == "parked"
    with session_scope() as session:
        stage(session, "op-stalled", [Outgoing(Message("default", "x", (), {}, {}))])
        session.flush()
        session.execute(update(OutboxMessage).values(created_at=utcnow() - timedelta(seconds=30)))
        marked_at = utcnow() - timedelta(seconds=10)
        session.add(Operation(executor="MetricsProbe", resource_ref="instance:x", plan={}, first_steps_since=marked_at))

    # When Prometheus scrapes
    families = list(JobsCollector(throttle).collect())

    # Then the gauges show that state
    assert samples(families, "jobs_throttle_holders")[(scope.key,)] == 1
    assert samples(families, "jobs_throttle_waiters")[(scope.key,)] == 1
    assert samples(families, "jobs_throttle_limit")[(scope.key,)] == 1
    assert samples(families, "jobs_outbox_backlog") == {(): 2}
    assert 29 <= samples(families, "jobs_outbox_oldest_age_seconds")[()] < 120
    assert samples(families, "jobs_operations_running")[("MetricsProbe",)] == 1
    assert samples(families, "jobs_metrics_source_up") == {("redis",): 1, ("database",): 1}

    # ... and they follow it: the holder releases, its slot goes to the waiter
    throttle.store.release("op-holding")
    families = list(JobsCollector(throttle).collect())
    assert samples(families, "jobs_throttle_holders")[(scope.key,)] == 1
    assert samples(families, "jobs_throttle_waiters")[(scope.key,)] == 0


def test_a_source_that_cannot_be_read_leaves_the_rest_of_the_scrape_working(stub_broker, monkeypatch):
    throttle = Throttle()

    def unreachable() -> None:
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(throttle.store, "occupancy", unreachable)
    families = list(JobsCollector(throttle).collect())
    assert samples(families, "jobs_metrics_source_up") == {("redis",): 0, ("database",): 1}
    assert samples(families, "jobs_throttle_holders") == {}
    assert samples(families, "jobs_outbox_backlog") == {(): 0}


def test_metrics_are_off_by_default_and_first_in_line_when_on(monkeypatch):
    monkeypatch.delenv("JOBS_BROKER")
    monkeypatch.delenv("JOBS_METRICS", raising=False)
    assert not any(isinstance(m, JobsPrometheus) for m in build_broker().middleware)

    monkeypatch.setenv("JOBS_METRICS", "1")
    middleware = build_broker().middleware
    position = next(i for i, m in enumerate(middleware) if isinstance(m, JobsPrometheus))
    skippers = ("AgeLimit", "Deduplicate", "OperationTransitions", "Throttle")
    assert all(position < i for i, m in enumerate(middleware) if type(m).__name__ in skippers)
    # Dramatiq runs our exposition server, not its own, in the fork process
    assert middleware[position].forks == [serve_metrics]


# A worker process as ``dramatiq`` runs one: the broker module is imported, then the process boots; the
# metrics it records must land in the multiprocess files, where the exposition server reads them.
_WORKER = """
from jobs.broker import broker
broker.emit_after("process_boot")
from resources import metrics
metrics.dedup_skipped("probe", "run")
metrics.janitor_rescued("CREATING")
"""


def test_a_worker_process_writes_its_metrics_where_the_exposition_server_reads_them(tmp_path: Path, database):
    directory = tmp_path / "prom"
    directory.mkdir()
    env = {**os.environ, "JOBS_METRICS": "1", "dramatiq_prom_db": str(directory)}
    env.pop("JOBS_BROKER")
    subprocess.run([sys.executable, "-c", _WORKER], env=env, check=True, timeout=60)

    scrape = generate_latest(exposition_registry(str(directory), JobsCollector(Throttle()))).decode()
    assert 'jobs_dedup_skips_total{job="probe",stage="run"} 1.0' in scrape
    assert 'jobs_janitor_rescues_total{state="CREATING"} 1.0' in scrape
    # Unlabelled metrics show from the process's boot, before their first event
    assert "jobs_throttle_handoff_latency_seconds_count 0.0" in scrape
    assert "jobs_outbox_relayed_total 0.0" in scrape
    assert "jobs_outbox_backlog 0.0" in scrape
