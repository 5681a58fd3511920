"""The Procfile's scheduler and background workers as real processes on a real Redis."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter

import dramatiq
import pytest

from jobs.broker import build_broker
from jobs.executors import InstanceCreateExecutor
from jobs.processes import ManagedProcess, start_scheduler, start_worker, stop_all
from middleware import DuplicateJob, find_deduplicate
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.config import get_settings
from resources.db import session_scope
from resources.models import Instance
from resources.redis_client import get_redis
from tests.conftest import SQLITE_INTEGRATION_URL
from tests.fixtures import make_instance, make_tenant, reset_database, wait_for
from tests.integration import background_probe
from tests.integration.background_probe import probe_block, probe_work, runs_key, work_key
from tests.integration.conftest import queued_messages

pytestmark = pytest.mark.integration

MODULES = ("scheduler.app", "tests.integration.background_probe")
#: The scheduler lease in these tests: a dead leader is replaced within it.
LEASE_S = 2.0
PROBE_EVERY_S = 3


@pytest.fixture
def namespace(monkeypatch) -> str:
    """A namespace of its own (queues, guards, ledger) and the real broker for this test's sends."""
    name = f"{os.environ['JOBS_NAMESPACE']}-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("JOBS_NAMESPACE", name)
    monkeypatch.setenv("DATABASE_URL", SQLITE_INTEGRATION_URL)
    monkeypatch.delenv("JOBS_BROKER")
    return name


@pytest.fixture
def real_broker(namespace):  # type: ignore[no-untyped-def]
    """A RedisBroker with the project's middleware that knows the probe actors (they were declared on
    the test's stub broker at import)."""
    broker = build_broker()
    for actor in (probe_work, probe_block, background_probe.probe_tick):
        broker.declare_actor(actor)
    previous = dramatiq.get_broker()
    dramatiq.set_broker(broker)
    yield broker
    dramatiq.set_broker(previous)


@pytest.fixture
def processes():  # type: ignore[no-untyped-def]
    started: list[ManagedProcess] = []
    yield started
    stop_all(started)


def background_worker(tmp_path, env=None) -> ManagedProcess:  # type: ignore[no-untyped-def]
    return start_worker(
        "background",
        module="scheduler.app",
        extra_modules=["tests.integration.background_probe"],
        queues=["background"],
        threads=2,
        env=env,
        log_path=tmp_path / "background.log",
    )


def test_periodic_pull_refreshes_runtime_state(namespace, processes, tmp_path):
    # Given an OK instance whose stored runtime state has drifted from its backend's
    reset_database()
    cloud = SimulatedCloud()
    cloud.configure(SimulatedConfig(build_ms=0))
    instance = make_instance(make_tenant(), volumes=0)
    InstanceCreateExecutor.execute(instance, is_async=False)
    with session_scope() as session:
        session.get(Instance, instance.id).runtime_state = "drifted"

    # When the scheduler runs with the pull due every 2 s
    env = {"JOBS_PULL_SCHEDULE": "@every 2s"}
    processes.append(start_scheduler(env=env, log_path=tmp_path / "scheduler.log"))
    processes.append(background_worker(tmp_path, env))

    # Then a background worker pulls the instance and stores the backend's runtime state
    def refreshed() -> bool:
        with session_scope() as session:
            return session.get(Instance, instance.id).runtime_state == "ACTIVE"

    wait_for(refreshed, timeout_s=120)
    cloud.reset()


def test_two_schedulers_run_every_tick_once_and_hand_over_when_the_leader_dies(
    namespace, real_broker, processes, tmp_path
):
    # Given two scheduler processes, a background worker, and a job ticking every 3 s (longer than a hand-over,
    # whose missed ticks are coalesced into one by design)
    env = {"JOBS_SCHEDULER_LEASE_S": str(LEASE_S), "JOBS_PROBE_SCHEDULE": f"@every {PROBE_EVERY_S}s"}
    schedulers = {
        name: start_scheduler(name, modules=MODULES, env=env, log_path=tmp_path / f"{name}.log")
        for name in ("scheduler-1", "scheduler-2")
    }
    processes.extend(schedulers.values())
    processes.append(background_worker(tmp_path))
    client = get_redis()
    runs = lambda: client.lrange(runs_key(), 0, -1)  # noqa: E731

    # When the job has run a few times, the leader is SIGKILLed
    wait_for(lambda: len(runs()) >= 3, timeout_s=120)
    holder = client.get(f"{namespace}:scheduler:leader")
    leader_pid = int(holder.split(":")[1])
    [leader_name] = [name for name, p in schedulers.items() if p.process.pid == leader_pid]
    killed_at = time.monotonic()
    os.killpg(leader_pid, signal.SIGKILL)
    schedulers[leader_name].process.wait()
    new_holder = wait_for(
        lambda: (h := client.get(f"{namespace}:scheduler:leader")) and h != holder and h, timeout_s=60, interval_s=0.01
    )
    handover_s = time.monotonic() - killed_at
    runs_at_handover = len(runs())
    wait_for(lambda: len(runs()) >= runs_at_handover + 3, timeout_s=120)
    stop_all(processes)

    # Then the other scheduler took over within the lease (plus the time to notice and start a round)
    print(f"hand-over after SIGKILL of the leader: {handover_s:.2f} s (lease {LEASE_S} s)")
    assert new_holder.split(":")[1] != str(leader_pid)
    assert handover_s <= LEASE_S + 1.5

    # And every tick from the first to the last ran exactly once: none lost at the hand-over, none twice
    ticks = [int(run.split()[0]) for run in runs()]
    counts = Counter(ticks)
    assert [tick for tick, count in counts.items() if count > 1] == []
    assert sorted(counts) == list(range(min(ticks), max(ticks) + 1, PROBE_EVERY_S))

    # And no tick was sent twice
    history = client.xrange(f"{namespace}:scheduler:history")
    sent = [entry["tick"] for _id, entry in history if entry["job"] == "probe_tick" and entry["outcome"] == "sent"]
    assert len(sent) == len(set(sent))
    assert {entry["scheduler"].split(":")[1] for _id, entry in history} == {str(leader_pid), new_holder.split(":")[1]}


def test_an_equal_job_is_not_enqueued_while_it_waits_in_a_backlog(namespace, real_broker, processes, tmp_path):
    # Given a backlog of 500 background jobs and no worker yet, one of them "equal"
    for n in range(500):
        real_broker.enqueue(probe_work.message(n))
    client = get_redis()
    assert queued_messages(real_broker, "background") == 500

    # When the equal job is sent again while the first waits in the backlog
    with pytest.raises(DuplicateJob):
        real_broker.enqueue(probe_work.message(499))

    # Then it was not enqueued, and the skip was counted
    assert queued_messages(real_broker, "background") == 500
    assert find_deduplicate(real_broker).skipped() == {"probe_work:enqueue": 1}

    # And once workers drain the backlog, it ran once; afterwards it can be sent again
    processes.append(background_worker(tmp_path))
    wait_for(lambda: client.llen(work_key()) >= 500, timeout_s=180)
    done = Counter(client.lrange(work_key(), 0, -1))
    assert done["499"] == 1 and len(done) == 500
    real_broker.enqueue(probe_work.message(499))


def test_the_guard_of_a_job_whose_worker_was_killed_expires(namespace, monkeypatch, real_broker, processes, tmp_path):
    # Given a background job running on a worker, its guard renewed by the worker's heartbeat
    monkeypatch.setenv("JOBS_DEDUP_LEASE_S", "2")
    env = {"JOBS_DEDUP_LEASE_S": "2"}
    worker = background_worker(tmp_path, env)
    processes.append(worker)
    client = get_redis()
    real_broker.enqueue(probe_block.message("k"))
    wait_for(lambda: "started k" in client.lrange(work_key(), 0, -1), timeout_s=120)
    dedup = find_deduplicate(real_broker)
    assert dedup.owner(real_broker, probe_block.message("k")) is not None
    with pytest.raises(DuplicateJob):  # while it runs, an equal job is refused
        real_broker.enqueue(probe_block.message("k"))

    # When the worker is SIGKILLed mid-job
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()

    # Then the guard expires (no heartbeat renews it) and an equal job can be enqueued again
    wait_for(lambda: dedup.owner(real_broker, probe_block.message("k")) is None, timeout_s=30)
    real_broker.enqueue(probe_block.message("k"))
    client.rpush(f"{get_settings().namespace}:probe:release:k", "go", "go")
