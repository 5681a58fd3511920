"""``python -m jobs status``, ``explain`` and ``dead-letters``: the data they gather and what they print.

Status runs on the StubBroker; dead letters live only in the Redis broker, so those tests use a
JobsRedisBroker of their own on the test Redis, made current while a command runs.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC
from typing import Any
from zoneinfo import ZoneInfo

import dramatiq
import pytest
from click.testing import CliRunner
from dramatiq import Message

import scheduler.app  # noqa: F401  (declares the periodic jobs on the project broker before any test swaps it)
from jobs.cli import main
from jobs.dead_letters import Body, DeadLetters, QueueKeys, UnknownDeadLetters, UnknownQueue
from jobs.executors import InstanceCreateExecutor
from jobs.redis_broker import JobsRedisBroker
from jobs.status import gather_status, queue_counts, throttle_summary
from middleware import Throttle, ThrottleScope, find_deduplicate, find_inflight
from middleware.plan import OPTION_NODE, OPTION_OPERATION
from resources.db import session_scope
from resources.models import Operation, OperationStatus
from resources.redis_client import get_redis
from scheduler.leader import LeaderLease
from scheduler.ledger import TickLedger
from scheduler.runner import Scheduler, periodic_jobs, redis_clock
from scheduler.status import scheduler_status
from tests.fixtures import make_instance, make_tenant

LIMIT_OPTION = "max_concurrent_provision_instance"


def _scheduler() -> Scheduler:
    """The project's periodic jobs with a lease and ledger of this test's own."""
    client = get_redis()
    prefix = f"{os.environ['JOBS_NAMESPACE']}:sched-{uuid.uuid4().hex[:8]}"
    return Scheduler(
        periodic_jobs(dramatiq.get_broker(), ZoneInfo("UTC")),
        lease=LeaderLease(client, f"{prefix}:leader", ttl_s=15),
        ledger=TickLedger(client, prefix),
        clock=redis_clock(client),
    )


def _throttled_creates() -> tuple[Any, list[Any], str]:
    """Two instance creates in a tenant that allows one at a time: one holds its scope, one waits."""
    tenant = make_tenant(f"t-{uuid.uuid4().hex[:6]}", options={LIMIT_OPTION: 1})
    instances = [make_instance(tenant, f"vm-{i}", volumes=1) for i in range(2)]
    handles = [InstanceCreateExecutor.execute(instance) for instance in instances]
    return tenant, handles, f"provision:instance:{tenant.uuid}"


# -- status ----------------------------------------------------------------------------------------------
def test_status_counts_resources_operations_queues_and_scopes(stub_broker):
    # Given two creates of a tenant that allows one at a time, nothing consuming
    _tenant, handles, scope = _throttled_creates()

    # When the status is gathered
    report = gather_status(
        broker=stub_broker, store=Throttle().store, scheduler=scheduler_status(_scheduler()), oldest=1
    )

    # Then resources are counted per type and state
    assert report.resources == {"instance": {"CREATION_SCHEDULED": 2}, "volume": {"CREATION_SCHEDULED": 2}}
    # ... both operations are in flight, the oldest listed first
    in_flight = report.operations_in_flight
    assert in_flight.count == 2
    assert [(o.id, o.executor) for o in in_flight.oldest] == [(handles[0].id, "InstanceCreateExecutor")]
    assert in_flight.oldest[0].age_s >= 0 and in_flight.oldest[0].started.tzinfo is UTC
    # ... only the admitted operation's first step is queued
    assert report.queues["default"].ready == 1
    assert set(report.queues) == {"background", "default", "heavy"}
    # ... and the scope shows its holder and its waiter
    summary = next(s for s in report.throttle if s.scope == scope)
    assert (summary.limit, summary.holders, summary.waiters) == (1, 1, 1)
    assert summary.oldest_wait_s is not None and summary.oldest_wait_s >= 0


def test_queue_counts_of_the_stub_broker_tell_delayed_and_dead_lettered(stub_broker):
    # Given a delayed message and a dead-lettered one
    stub_broker.enqueue(Message("default", "no_such_actor", (), {}, {}), delay=60_000)
    stub_broker.dead_letters_by_queue["heavy"].append(Message("heavy", "no_such_actor", (), {}, {}))
    try:
        counts = queue_counts(stub_broker)
    finally:
        stub_broker.dead_letters_by_queue["heavy"].clear()

    # Then each is counted on its queue
    assert (counts["default"].ready, counts["default"].delayed, counts["default"].dead_lettered) == (0, 1, 0)
    assert counts["heavy"].dead_lettered == 1


def test_oldest_wait_is_how_long_the_first_in_line_has_waited(stub_broker):
    # Operation ids of this test's own: the unit tests share one throttle namespace.
    store = Throttle().store
    scope = f"wait-{uuid.uuid4().hex[:8]}"
    holder, first, second = (f"{name}-{scope}" for name in ("holder", "first", "second"))
    now_ms = _redis_now_ms()
    store.acquire(holder, [ThrottleScope(scope, 1)], start=True, now_ms=now_ms - 9000)
    store.acquire(first, [ThrottleScope(scope, 1)], start=False, now_ms=now_ms - 5000)
    store.acquire(second, [ThrottleScope(scope, 1)], start=False, now_ms=now_ms - 1000)
    try:
        summary = next(s for s in throttle_summary(store) if s.scope == scope)
    finally:
        for operation_id in (second, first, holder):
            store.release(operation_id)

    assert (summary.holders, summary.waiters) == (1, 2)
    assert 5.0 <= summary.oldest_wait_s < 7.0


def _redis_now_ms() -> int:
    seconds, micros = get_redis().time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_scheduler_status_names_the_leader_and_each_jobs_last_and_next_run(stub_broker):
    # Given a scheduler that never ran
    scheduler = _scheduler()
    before = scheduler_status(scheduler)
    assert (before.leader, before.lease_expires_in_s) == (None, None)
    assert {job.name for job in before.jobs} >= {"janitor", "pull_resources", "prune_operations"}  # and tests' own
    assert all(job.last_run is None for job in before.jobs)

    # When it leads one round
    scheduler.round()
    try:
        after = scheduler_status(scheduler)
    finally:
        scheduler.lease.release()

    # Then it is the leader, and each job has a last handled tick before its next one
    assert after.leader == scheduler.lease.identity
    assert 0 < after.lease_expires_in_s <= 15
    jobs = {job.name: job for job in after.jobs}
    assert jobs["janitor"].cron == "*/10 * * * *"
    assert jobs["prune_operations"].cron == "30 * * * *"
    assert all(job.last_run is not None and job.next_run > job.last_run for job in after.jobs)


def test_status_json_has_every_part(stub_broker):
    _tenant, handles, scope = _throttled_creates()

    result = CliRunner().invoke(main, ["status", "--json", "--oldest", "5"])

    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert set(shown) == {"generated_at", "resources", "operations_in_flight", "queues", "throttle", "scheduler"}
    assert shown["resources"]["instance"] == {"CREATION_SCHEDULED": 2}
    assert shown["operations_in_flight"]["count"] == 2
    oldest = shown["operations_in_flight"]["oldest"]
    assert [o["id"] for o in oldest] == [h.id for h in handles]
    assert set(oldest[0]) == {"id", "executor", "resource_ref", "started", "age_s"}
    assert shown["queues"]["default"] == {"ready": 1, "delayed": 0, "dead_lettered": 0, "in_progress": 0}
    entry = next(s for s in shown["throttle"] if s["scope"] == scope)
    assert set(entry) == {"scope", "limit", "holders", "waiters", "oldest_wait_s"}
    assert (entry["limit"], entry["holders"], entry["waiters"]) == (1, 1, 1)
    assert set(shown["scheduler"]) == {"leader", "lease_expires_in_s", "jobs"}
    assert {j["name"] for j in shown["scheduler"]["jobs"]} >= {"janitor", "pull_resources"}
    assert set(shown["scheduler"]["jobs"][0]) == {"name", "cron", "last_run", "next_run"}


def test_status_prints_a_table_per_part(stub_broker, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's width: nothing folded
    _throttled_creates()

    result = CliRunner().invoke(main, ["status"], terminal_width=200)

    assert result.exit_code == 0, result.output
    for heading in ("Resources", "Operations in flight: 2", "Queues", "Throttle scopes", "Periodic jobs"):
        assert heading in result.output
    assert "CREATION_SCHEDULED" in result.output and "InstanceCreateExecutor" in result.output
    assert "no leader" in result.output


def test_explain_is_throttle_explain(stub_broker):
    _tenant, handles, scope = _throttled_creates()
    runner = CliRunner()

    top = runner.invoke(main, ["explain", scope, "--json"])
    nested = runner.invoke(main, ["throttle", "explain", scope, "--json"])

    assert top.exit_code == 0, top.output
    shown = json.loads(top.output)
    assert shown == json.loads(nested.output)
    assert [h["operation_id"] for h in shown["holders"]] == [handles[0].id]
    assert [w["operation_id"] for w in shown["waiters"]] == [handles[1].id]


# -- dead letters ----------------------------------------------------------------------------------------
QUEUE = "default"


def _dead_letter(broker: JobsRedisBroker, message: Message[Any], queue: str = QUEUE) -> str:
    """What a worker does with a message that fails for good: fetch it, then nack it."""
    sent = broker.enqueue(message)
    redis_id = sent.options["redis_message_id"]
    fetched = broker.do_fetch(queue, 100)
    assert fetched, "nothing to fetch"
    broker.do_nack(queue, redis_id)
    time.sleep(0.002)  # dead letters are scored in ms: the next one sorts as newer
    return redis_id


def _dead_letter_raw(broker: JobsRedisBroker, body: bytes, queue: str = QUEUE) -> str:
    redis_id = f"raw-{uuid.uuid4().hex[:8]}"
    broker.do_enqueue(queue, redis_id, body)
    broker.do_fetch(queue, 100)
    broker.do_nack(queue, redis_id)
    time.sleep(0.002)
    return redis_id


def _failed_operation(step: str = "backend_method") -> str:
    with session_scope() as session:
        operation = Operation(
            executor="InstanceCreateExecutor",
            resource_ref="instance:abc",
            status=OperationStatus.FAILED,
            failed_step=step,
            error_message="simulated cloud refused instance.create",
            error_traceback="Traceback (most recent call last):\nBackendError: refused",
        )
        session.add(operation)
        session.flush()
        return operation.id


def _step(operation_id: str, **options: Any) -> Message[Any]:
    return Message(
        QUEUE,
        "backend_method",
        ("instance:abc", "create"),
        {},
        {OPTION_OPERATION: operation_id, OPTION_NODE: "1", "resource": "instance:abc", **options},
    )


def test_dead_letters_are_listed_newest_first_with_the_error_from_where_it_was_kept(redis_broker):
    # Given four dead letters: a step of a failed operation, a retried plain job, an unreadable body,
    # and a job that failed on its first attempt
    operation_id = _failed_operation()
    step = _dead_letter(redis_broker, _step(operation_id))
    retried = _dead_letter(
        redis_broker,
        Message(QUEUE, "some_job", (), {}, {"retries": 2, "traceback": "Traceback...\nValueError: try two"}),
    )
    unreadable = _dead_letter_raw(redis_broker, b"\xff not json")
    silent = _dead_letter(redis_broker, Message(QUEUE, "other_job", (1,), {}, {}))

    # When they are listed
    listing = DeadLetters(redis_broker).listing()

    # Then the newest comes first, each with its error and where it came from
    assert listing.counts == {"default": 4, "heavy": 0}
    assert [item.id for item in listing.items] == [silent, unreadable, retried, step]
    by_id = {item.id: item for item in listing.items}
    assert by_id[step].error == "simulated cloud refused instance.create"
    assert (by_id[step].error_source, by_id[step].operation_status) == ("operation", "failed")
    assert by_id[step].traceback.endswith("BackendError: refused")
    assert (by_id[step].actor, by_id[step].resource, by_id[step].is_step) == ("backend_method", "instance:abc", True)
    assert by_id[retried].error == "earlier attempt: ValueError: try two"
    assert (by_id[retried].error_source, by_id[retried].retries) == ("earlier_attempt", 2)
    assert by_id[unreadable].error_source == "unreadable" and "does not decode" in by_id[unreadable].error
    assert by_id[silent].error_source == "none" and "not recorded" in by_id[silent].error

    # ... and --limit keeps the newest
    assert [item.id for item in DeadLetters(redis_broker).listing(limit=2).items] == [silent, unreadable]


def test_the_operations_error_is_not_shown_for_another_step_of_it(redis_broker):
    operation_id = _failed_operation(step="poll_runtime_state")
    _dead_letter(redis_broker, _step(operation_id))

    (item,) = DeadLetters(redis_broker).listing().items

    assert item.error_source == "none"


def test_requeue_moves_it_back_under_its_id_with_its_attempts_forgotten(redis_broker):
    # Given a dead-lettered step of a failed operation that had been retried
    operation_id = _failed_operation()
    redis_id = _dead_letter(redis_broker, _step(operation_id, retries=3, traceback="Traceback...\nOops"))
    keys = QueueKeys(redis_broker.namespace, QUEUE)
    tokens = redis_broker.client.llen(redis_broker.wakeups_key(QUEUE))

    # When it is requeued
    (result,) = DeadLetters(redis_broker).requeue([redis_id])

    # Then it left the dead letters for its queue, in one move, under the same id
    assert result.outcome == "requeued"
    assert "already failed: a worker will skip this step" in result.detail
    assert "does not resume an operation" in result.detail
    assert redis_broker.client.zcard(keys.dead) == 0 and redis_broker.client.hlen(keys.dead_bodies) == 0
    assert [i.decode() for i in redis_broker.client.lrange(keys.ready, 0, -1)] == [redis_id]
    # ... with a token that wakes an idle consumer, as an enqueue leaves
    assert keys.wakeups == redis_broker.wakeups_key(QUEUE) and redis_broker.client.llen(keys.wakeups) == tokens + 1
    # ... its retry count and traceback are gone, and the in-flight tracking knows it again
    body = json.loads(redis_broker.client.hget(keys.bodies, redis_id))
    assert "retries" not in body["options"] and "traceback" not in body["options"]
    assert find_inflight(redis_broker).copies(operation_id) == {f"{body['message_id']}@{QUEUE}#{redis_id}"}
    # ... and a consumer takes it as a good message
    consumer = redis_broker.consume(QUEUE)
    try:
        delivered = next(consumer)
        assert delivered is not None and delivered.options["redis_message_id"] == redis_id
    finally:
        consumer.close()


def test_an_unknown_id_requeues_nothing(redis_broker):
    known = _dead_letter(redis_broker, Message(QUEUE, "some_job", (), {}, {}))

    with pytest.raises(UnknownDeadLetters) as raised:
        DeadLetters(redis_broker).requeue([known, "no-such-id"])

    assert "no dead-lettered message no-such-id" in str(raised.value)
    assert DeadLetters(redis_broker).counts() == {"default": 1, "heavy": 0}
    with pytest.raises(UnknownQueue):
        DeadLetters(redis_broker).listing("nope")


def test_requeue_leaves_an_unreadable_body_and_a_duplicate_job_dead_lettered(redis_broker):
    # Given an unreadable body, and a job of a de-duplicating actor whose equal job is queued meanwhile
    dramatiq.actor(lambda: None, actor_name="dedup_job", queue_name=QUEUE, broker=redis_broker, dedup=True)
    unreadable = _dead_letter_raw(redis_broker, json.dumps({"options": {"operation_id": "op-1"}}).encode())
    duplicate = _dead_letter(redis_broker, Message(QUEUE, "dedup_job", (), {}, {}))
    dedup = find_deduplicate(redis_broker)
    # A worker gives the guard back when a job fails for good; an equal job sent since has taken it.
    redis_broker.client.delete(*redis_broker.client.keys(f"{dedup.prefix}:dedup_job:*"))
    redis_broker.enqueue(Message(QUEUE, "dedup_job", (), {}, {}))

    # When everything is requeued
    results = {r.id: r for r in DeadLetters(redis_broker).requeue_all()}

    # Then neither moved, each saying why
    assert results[unreadable].outcome == "unreadable" and "it has no actor_name" in results[unreadable].detail
    assert results[unreadable].operation_id == "op-1"
    assert results[duplicate].outcome == "duplicate" and "equal job" in results[duplicate].detail
    assert DeadLetters(redis_broker).counts() == {"default": 2, "heavy": 0}


def test_requeue_all_of_one_queue(redis_broker):
    on_default = _dead_letter(redis_broker, Message(QUEUE, "some_job", (), {}, {}))
    on_heavy = _dead_letter(redis_broker, Message("heavy", "some_job", (), {}, {}), queue="heavy")

    results = DeadLetters(redis_broker).requeue_all("heavy")

    assert [(r.id, r.outcome, r.detail) for r in results] == [(on_heavy, "requeued", "a worker runs it again")]
    assert DeadLetters(redis_broker).counts() == {"default": 1, "heavy": 0}
    assert on_default in {i.id for i in DeadLetters(redis_broker).listing().items}


def test_dead_letters_commands(redis_broker, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    # Given a dead-lettered step of a failed operation
    operation_id = _failed_operation()
    redis_id = _dead_letter(redis_broker, _step(operation_id))
    runner = CliRunner()

    # When they are listed, as JSON and as a table
    shown = json.loads(runner.invoke(main, ["dead-letters", "--json"]).output)
    table = runner.invoke(main, ["dead-letters", "--queue", QUEUE], terminal_width=250)

    # Then the message is there with its error
    assert (shown["total"], shown["counts"]) == (1, {"default": 1, "heavy": 0})
    (entry,) = shown["dead_letters"]
    assert (entry["id"], entry["operation_id"], entry["error_source"]) == (redis_id, operation_id, "operation")
    assert entry["error"] == "simulated cloud refused instance.create"
    assert entry["age_s"] >= 0 and entry["dead_lettered_at"].endswith("+00:00")
    assert table.exit_code == 0, table.output
    assert redis_id in table.output and "simulated cloud refused" in table.output
    assert "does not resume an operation" in table.output

    # When a command names no message, or an unknown one
    neither = runner.invoke(main, ["dead-letters", "requeue"])
    unknown = runner.invoke(main, ["dead-letters", "requeue", "nope"])

    # Then it says so and requeues nothing
    assert neither.exit_code == 2 and "or pass --all" in neither.output
    assert unknown.exit_code == 1 and "no dead-lettered message nope" in unknown.output

    # When it is requeued
    result = runner.invoke(main, ["dead-letters", "requeue", redis_id, "--json"])

    # Then it is back on its queue, and the output says its operation will not resume
    assert result.exit_code == 0, result.output
    requeued = json.loads(result.output)
    assert requeued["requeued"] == 1
    assert requeued["results"][0]["outcome"] == "requeued"
    assert "will skip this step" in requeued["results"][0]["detail"]
    assert json.loads(runner.invoke(main, ["dead-letters", "--json"]).output)["total"] == 0


def test_dead_letters_need_the_redis_broker(stub_broker):
    result = CliRunner().invoke(main, ["dead-letters"])

    assert result.exit_code == 1
    assert "reads the Redis broker's dead letters" in result.output and "unset JOBS_BROKER" in result.output


def test_requeue_takes_the_groups_queue_and_json(redis_broker):
    on_default = _dead_letter(redis_broker, Message(QUEUE, "some_job", (), {}, {}))
    on_heavy = _dead_letter(redis_broker, Message("heavy", "some_job", (), {}, {}), queue="heavy")

    result = CliRunner().invoke(main, ["dead-letters", "--queue", "heavy", "--json", "requeue", "--all"])

    assert result.exit_code == 0, result.output
    assert [r["id"] for r in json.loads(result.output)["results"]] == [on_heavy]
    assert DeadLetters(redis_broker).find([on_default, on_heavy]) == {on_default: QUEUE}


def test_a_requeue_that_lost_a_race_moves_nothing(redis_broker):
    # Given a dead letter read by one requeue, then requeued by another before the first moves it
    redis_id = _dead_letter(redis_broker, Message(QUEUE, "some_job", (), {}, {}))
    store = DeadLetters(redis_broker)
    keys = QueueKeys(redis_broker.namespace, QUEUE)
    stale = Body.parse(redis_broker.client.hget(keys.dead_bodies, redis_id), QUEUE)
    assert [r.outcome for r in store.requeue([redis_id])] == ["requeued"]

    # When the first goes on with what it read
    result = store._requeue_one(QUEUE, redis_id, stale, {})

    # Then it reports the other's win and the message is queued once
    assert (result.outcome, result.detail) == ("gone", "requeued meanwhile by someone else")
    assert [i.decode() for i in redis_broker.client.lrange(keys.ready, 0, -1)] == [redis_id]
