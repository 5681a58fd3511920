"""De-duplication of background jobs, periodic tick claims, and in-flight tracking of operations."""

from __future__ import annotations

import threading

import dramatiq
import pytest
from dramatiq import Message

from middleware import DuplicateJob, find_deduplicate, find_inflight
from middleware.plan import OPTION_OPERATION
from resources.redis_client import get_redis
from scheduler.background import background_job
from tests.fixtures import RECORDER, drain, wait_for

calls: list[str] = []
attempts: dict[str, int] = {}
release_blocked = threading.Event()


@background_job
def refresh(ref: str) -> None:
    calls.append(ref)


@background_job(dedup=lambda tenant, **_: tenant)
def sync_tenant(tenant: str, verbose: bool = False) -> None:
    calls.append(tenant)


# The retry waits at least a second: long enough to see its guard held while it waits.
@background_job(max_retries=1, min_backoff=2000, max_backoff=2000)
def flaky(ref: str) -> None:
    attempts[ref] = attempts.get(ref, 0) + 1
    if attempts[ref] == 1:
        raise RuntimeError("first attempt fails")


@background_job(max_retries=0)
def broken(ref: str) -> None:
    raise RuntimeError("always fails")


@background_job
def blocked(ref: str) -> None:
    release_blocked.wait(30)


@dramatiq.actor(queue_name="background", dedup=True, max_retries=0)
def plain_dedup(ref: str) -> None:
    pass


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    attempts.clear()
    release_blocked.clear()


def queued(broker, actor_name: str) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for raw in list(broker.queues["background"].queue) if Message.decode(raw).actor_name == actor_name)


def test_an_equal_job_is_not_enqueued_while_one_is_queued(stub_broker):
    # Given a queued job
    first = refresh.send("Instance:1")

    # When an equal one and a different one are sent
    second = refresh.send("Instance:1")
    other = refresh.send("Instance:2")

    # Then the equal one is not enqueued (send returns None) and the skip is counted
    assert first is not None and other is not None and second is None
    assert queued(stub_broker, "refresh") == 2
    assert find_deduplicate(stub_broker).skipped()["refresh:enqueue"] == 1


def test_a_plain_actor_with_dedup_raises_a_clear_error(stub_broker):
    plain_dedup.send("x")
    with pytest.raises(DuplicateJob, match=r"plain_dedup not enqueued: an equal job \(message .*\) is queued"):
        plain_dedup.send("x")


def test_the_dedup_key_may_be_a_function_of_the_arguments(stub_broker):
    assert sync_tenant.send("t1") is not None
    assert sync_tenant.send("t1", verbose=True) is None  # same key: the tenant
    assert sync_tenant.send("t2") is not None


def test_the_guard_is_released_when_the_job_finishes(stub_broker, stub_worker):
    refresh.send("Instance:1")
    drain(stub_broker)
    assert refresh.send("Instance:1") is not None
    drain(stub_broker)
    assert calls == ["Instance:1", "Instance:1"]


def test_the_guard_is_kept_while_the_job_retries_and_released_when_it_fails_for_good(stub_broker, stub_worker):
    # Given a job whose first attempt fails (it will retry) and one that fails for good
    flaky.send("a")
    broken.send("b")

    # While the retry is pending an equal job is still refused
    wait_for(lambda: attempts.get("a") == 1)
    assert flaky.send("a") is None

    # After both ended, equal jobs can be sent again
    drain(stub_broker)
    assert attempts["a"] == 2
    assert flaky.send("a") is not None
    assert broken.send("b") is not None


def test_a_duplicate_that_reached_the_queue_is_not_run_while_the_first_runs(stub_broker, stub_worker):
    # Given a job running, and an equal message enqueued around the guard (sent while it had expired)
    blocked.send("x")
    dedup = find_deduplicate(stub_broker)
    wait_for(lambda: RECORDER.count("blocked") == 0 and dedup._running)
    duplicate = blocked.message("x")
    stub_broker.queues["background"].put(duplicate.encode())  # no before_enqueue: the guard is not asked

    # When the worker takes the duplicate
    wait_for(lambda: dedup.skipped().get("blocked:run") == 1)

    # Then it was skipped, not run; the first finishes normally
    release_blocked.set()
    drain(stub_broker)
    assert [ok for name, _q, _r, ok in RECORDER.processed if name == "blocked"] == [True]


def test_a_running_guard_expires_unless_its_worker_renews_it(stub_broker):
    # Given a guard held as "running" with a short lease by a worker that no longer renews it
    dedup = find_deduplicate(stub_broker)
    message = refresh.message("Instance:9")
    key = dedup.key_of(stub_broker, message)
    client = get_redis()
    client.set(key, message.message_id, px=300)

    # Then an equal job is refused while it lives, and accepted once it has expired
    assert refresh.send("Instance:9") is None
    wait_for(lambda: not client.exists(key), timeout_s=10)
    assert refresh.send("Instance:9") is not None


def test_the_heartbeat_renews_the_guards_of_running_jobs(stub_broker):
    dedup = find_deduplicate(stub_broker)
    message = refresh.message("Instance:7")
    key = dedup.key_of(stub_broker, message)
    client = get_redis()
    client.set(key, message.message_id, px=1000)
    dedup._running[key] = message.message_id
    try:
        dedup.renew()
        assert client.pttl(key) > 1000  # renewed to the full lease (30 s by default)
    finally:
        dedup._running.pop(key, None)


def test_a_failed_send_gives_the_guard_back(stub_broker, monkeypatch):
    import redis

    def unreachable(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise redis.ConnectionError("broker down")

    with monkeypatch.context() as patched:
        patched.setattr(stub_broker.queues["background"], "put", unreachable)
        with pytest.raises(redis.ConnectionError):
            refresh.send("Instance:3")
    assert refresh.send("Instance:3") is not None


# -- periodic tick claims --------------------------------------------------------------------------


@background_job(max_retries=2, min_backoff=10, max_backoff=10)
def tick_job() -> None:
    attempts["tick"] = attempts.get("tick", 0) + 1
    if attempts["tick"] == 1:
        raise RuntimeError("first attempt fails")


def test_a_retried_periodic_message_runs_however_old_its_tick(stub_broker, stub_worker):
    # Given a tick message scheduled an hour ago (periodiq drops anything older than 30 s as stale)
    tick_job.send_with_options(tick=1_000_000, scheduled_at="2026-11-21T11:00:00+00:00")

    # When its first attempt fails
    drain(stub_broker)

    # Then the retry ran and succeeded
    assert attempts["tick"] == 2


def test_a_second_message_for_a_tick_that_ran_is_skipped(stub_broker, stub_worker):
    # Given a tick that ran (a leader died after sending it and before recording it)
    attempts["tick"] = 1  # no failure this time
    tick_job.send_with_options(tick=2_000_000)
    drain(stub_broker)

    # When the next leader sends the same tick again
    tick_job.send_with_options(tick=2_000_000)
    drain(stub_broker)

    # Then it does not run twice; a message sent by hand (no tick) always runs
    assert attempts["tick"] == 2
    tick_job.send()
    drain(stub_broker)
    assert attempts["tick"] == 3


# -- in-flight tracking ----------------------------------------------------------------------------


# Its retry waits at least a second: long enough to see the waiting copy.
@dramatiq.actor(queue_name="background", max_retries=1, min_backoff=2000, max_backoff=2000)
def op_step(name: str) -> None:
    attempts[name] = attempts.get(name, 0) + 1
    if name == "retrying" and attempts[name] == 1:
        raise RuntimeError("retry me")


def test_an_operations_messages_are_tracked_while_queued_delayed_and_retrying(stub_broker, stub_worker):
    inflight = find_inflight(stub_broker)

    # A queued or delayed message counts; a processed one no longer does
    stub_worker.pause()
    op_step.send_with_options(args=("queued",), **{OPTION_OPERATION: "op-1"})
    op_step.send_with_options(args=("delayed",), delay=200, **{OPTION_OPERATION: "op-2"})
    assert len(inflight.copies("op-1")) == 1
    assert [c.endswith("@background.DQ") for c in inflight.copies("op-2")] == [True]
    stub_worker.resume()
    drain(stub_broker)
    wait_for(lambda: inflight.copies("op-1") == set() and inflight.copies("op-2") == set())

    # A message that failed and waits for its retry still counts until the retry has run
    op_step.send_with_options(args=("retrying",), **{OPTION_OPERATION: "op-3"})
    wait_for(lambda: attempts.get("retrying") == 1)
    wait_for(lambda: inflight.copies("op-3") and all(c.endswith(".DQ") for c in inflight.copies("op-3")))
    drain(stub_broker)
    assert attempts["retrying"] == 2
    wait_for(lambda: inflight.copies("op-3") == set())  # the ack hook runs just after the queue empties
