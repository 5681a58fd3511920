"""The scheduler loop: one leader, each tick sent once, catch-up after downtime, the next wake-up."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

import pytest
import redis
from dramatiq import Message
from freezegun import freeze_time

from resources.redis_client import get_redis
from scheduler.background import periodic_job
from scheduler.leader import LeaderLease
from scheduler.ledger import TickLedger
from scheduler.runner import PeriodicJob, Scheduler, periodic_jobs
from scheduler.schedules import InvalidSchedule, schedule_for
from tests.fixtures import RECORDER, drain, wait_for

UTC_ZONE = datetime.now(UTC).tzinfo


@periodic_job("@weekly", env="JOBS_TEST_WEEKLY_SCHEDULE")
def weekly_digest() -> None:
    pass


@periodic_job("*/5 * * * *", env="JOBS_TEST_FIVE_SCHEDULE")
def five_minutely() -> None:
    pass


class Clock:
    """A clock the test moves by hand (Unix seconds)."""

    def __init__(self, moment: datetime) -> None:
        self.now = moment.timestamp()

    def set(self, moment: datetime) -> None:
        self.now = moment.timestamp()

    def __call__(self) -> float:
        return self.now


def job(actor) -> PeriodicJob:  # type: ignore[no-untyped-def]
    from zoneinfo import ZoneInfo

    return PeriodicJob(actor, schedule_for(actor.actor_name, actor.options["periodic"], ZoneInfo("UTC")))


@pytest.fixture
def prefix() -> str:
    return f"test-scheduler-{uuid.uuid4().hex[:8]}"


def make_scheduler(prefix: str, clock, jobs, *, lease_s: float = 3600.0, name: str = "a") -> Scheduler:  # type: ignore[no-untyped-def]
    client = get_redis()
    return Scheduler(
        jobs,
        lease=LeaderLease(client, f"{prefix}:leader", ttl_s=lease_s, identity=name),
        ledger=TickLedger(client, prefix),
        clock=clock,
    )


def sent(broker, actor_name: str) -> list[Message]:  # type: ignore[no-untyped-def]
    messages = [Message.decode(raw) for raw in list(broker.queues["background"].queue)]
    return [m for m in messages if m.actor_name == actor_name]


def test_a_job_seen_for_the_first_time_waits_for_its_next_tick(stub_broker, prefix):
    # Given a scheduler started at 12:05:00 exactly, a tick of the five-minutely job
    clock = Clock(datetime(2026, 11, 21, 12, 5, tzinfo=UTC))
    scheduler = make_scheduler(prefix, clock, [job(five_minutely)])

    # When it runs a round, and another at the next tick
    scheduler.round()
    first = len(sent(stub_broker, "five_minutely"))
    clock.set(datetime(2026, 11, 21, 12, 10, 0, 300_000, tzinfo=UTC))
    scheduler.round()

    # Then nothing was sent at start-up (periodiq would have), and the 12:10 tick was
    assert first == 0
    [message] = sent(stub_broker, "five_minutely")
    assert message.options["tick"] == int(datetime(2026, 11, 21, 12, 10, tzinfo=UTC).timestamp())
    assert message.options["scheduled_at"] == "2026-11-21T12:10:00+00:00"


def test_two_schedulers_send_each_tick_once(stub_broker, stub_worker, prefix):
    # Given two scheduler processes sharing Redis and the same clock
    clock = Clock(datetime(2026, 11, 21, 12, 0, 30, tzinfo=UTC))
    first = make_scheduler(prefix, clock, [job(five_minutely)], name="first")
    second = make_scheduler(prefix, clock, [job(five_minutely)], name="second")
    first.round()
    second.round()

    # When both run rounds over three ticks
    for minute in (5, 10, 15):
        clock.set(datetime(2026, 11, 21, 12, minute, 1, tzinfo=UTC))
        second.round()
        first.round()
        second.round()
        drain(stub_broker)

    # Then only the first (the leader) sent, once per tick, and each tick ran once
    history = first.ledger.history()
    assert [(e.outcome, datetime.fromtimestamp(e.tick, UTC).minute) for e in history] == [
        ("sent", 5),
        ("sent", 10),
        ("sent", 15),
    ]
    assert {entry.scheduler for entry in history} == {"first"}
    assert RECORDER.count("five_minutely") == 3


def test_a_follower_takes_over_when_the_leader_stops_and_sends_the_tick_it_missed(stub_broker, prefix):
    # Given a leader and a follower
    clock = Clock(datetime(2026, 11, 21, 12, 0, 30, tzinfo=UTC))
    leader = make_scheduler(prefix, clock, [job(five_minutely)], name="leader")
    follower = make_scheduler(prefix, clock, [job(five_minutely)], name="follower")
    leader.round()
    follower.round()
    assert leader.lease.held and not follower.lease.held

    # When the leader goes away over the 12:05 tick (its lease released, as on SIGTERM, or expired)
    leader.lease.release()
    clock.set(datetime(2026, 11, 21, 12, 6, 40, tzinfo=UTC))
    follower.round()

    # Then the follower leads and sends the 12:05 tick, late but once
    assert follower.lease.holder() == "follower"
    [message] = sent(stub_broker, "five_minutely")
    assert message.options["scheduled_at"] == "2026-11-21T12:05:00+00:00"


def test_an_expired_lease_is_taken_over_and_the_old_leader_steps_down(stub_broker, prefix):
    # Given a leader whose lease runs out (a process frozen for longer than the lease)
    clock = Clock(datetime(2026, 11, 21, 12, 0, 30, tzinfo=UTC))
    old = make_scheduler(prefix, clock, [job(five_minutely)], lease_s=0.2, name="old")
    new = make_scheduler(prefix, clock, [job(five_minutely)], lease_s=0.2, name="new")
    assert old.lease.hold()

    # When the other one takes the lease once it expired
    def taken() -> bool:
        return new.lease.hold()

    wait_for(taken, timeout_s=10)

    # Then the old leader finds out on its next round and sends nothing
    clock.set(datetime(2026, 11, 21, 12, 5, 1, tzinfo=UTC))
    old.round()
    assert not old.lease.held
    assert sent(stub_broker, "five_minutely") == []


def test_ticks_missed_while_no_scheduler_ran_are_sent_once(stub_broker, prefix, caplog):
    # Given a job last handled at 12:00
    clock = Clock(datetime(2026, 11, 21, 12, 0, tzinfo=UTC))
    earlier = make_scheduler(prefix, clock, [job(five_minutely)])
    earlier.round()
    earlier.lease.release()

    # When a scheduler starts again at 12:31, six ticks later
    clock.set(datetime(2026, 11, 21, 12, 31, tzinfo=UTC))
    with caplog.at_level(logging.WARNING, logger="scheduler.runner"):
        make_scheduler(prefix, clock, [job(five_minutely)], name="b").round()

    # Then the job is sent once, for the latest missed tick, and the coalescing is logged
    [message] = sent(stub_broker, "five_minutely")
    assert message.options["scheduled_at"] == "2026-11-21T12:30:00+00:00"
    assert "ticks missed since" in caplog.text


def test_a_tick_whose_send_failed_is_sent_on_a_later_round(stub_broker, prefix, monkeypatch):
    # Given the broker is unreachable at the 12:05 tick
    clock = Clock(datetime(2026, 11, 21, 12, 0, 30, tzinfo=UTC))
    scheduler = make_scheduler(prefix, clock, [job(five_minutely)])
    scheduler.round()
    clock.set(datetime(2026, 11, 21, 12, 5, 0, 500_000, tzinfo=UTC))
    queue = stub_broker.queues["background"]

    def unreachable(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise redis.ConnectionError("broker down")

    with monkeypatch.context() as patched:
        patched.setattr(queue, "put", unreachable)  # fails after the middleware took the job's guard
        with pytest.raises(redis.ConnectionError):
            scheduler.round()

    # When it is back a little later
    clock.set(datetime(2026, 11, 21, 12, 5, 20, tzinfo=UTC))
    scheduler.round()

    # Then the 12:05 tick is sent then: not lost
    [message] = sent(stub_broker, "five_minutely")
    assert message.options["scheduled_at"] == "2026-11-21T12:05:00+00:00"


def test_a_tick_is_skipped_not_piled_up_while_the_previous_one_is_still_queued(stub_broker, prefix):
    # Given the 12:05 tick is queued and no worker has taken it
    clock = Clock(datetime(2026, 11, 21, 12, 0, 30, tzinfo=UTC))
    scheduler = make_scheduler(prefix, clock, [job(five_minutely)])
    scheduler.round()
    clock.set(datetime(2026, 11, 21, 12, 5, 1, tzinfo=UTC))
    scheduler.round()

    # When the 12:10 tick comes
    clock.set(datetime(2026, 11, 21, 12, 10, 1, tzinfo=UTC))
    scheduler.round()

    # Then it is recorded as skipped and not enqueued
    assert len(sent(stub_broker, "five_minutely")) == 1
    outcomes = [(e.outcome, datetime.fromtimestamp(e.tick, UTC).minute) for e in scheduler.ledger.history()]
    assert outcomes == [("sent", 5), ("skipped", 10)]


@freeze_time("2026-11-21 23:59:30")  # a Saturday
def test_the_next_wake_up_is_the_next_tick_of_any_job(stub_broker, prefix):
    import time

    # Given the weekly (Sunday) and five-minutely jobs, and a long lease (renewals do not cut in)
    scheduler = make_scheduler(prefix, time.time, [job(weekly_digest), job(five_minutely)])

    # Then the first round sleeps until Sunday 00:00, 30 s away
    assert scheduler.round() == pytest.approx(30.0)


@freeze_time("2026-11-22 00:00:00.250")  # Sunday
def test_at_the_sunday_tick_the_weekly_job_is_sent_and_the_wake_up_is_the_next_tick(stub_broker, prefix):
    import time

    # Given the weekly job was last handled on Saturday
    scheduler = make_scheduler(prefix, time.time, [job(weekly_digest)])
    scheduler.ledger.start_from("weekly_digest", datetime(2026, 11, 21, 23, 59, 30, tzinfo=UTC).timestamp())

    # When the scheduler wakes up at Sunday midnight
    wait = scheduler.round()

    # Then it sends the job and sleeps until the next Sunday (capped at its lease renewal)
    [message] = sent(stub_broker, "weekly_digest")
    assert message.options["scheduled_at"] == "2026-11-22T00:00:00+00:00"
    assert wait == pytest.approx(min(scheduler.renew_every_s, 7 * 86400 - 0.25))


def test_a_bad_schedule_on_any_actor_stops_the_scheduler_naming_it(stub_broker):
    # Given an actor declared with a periodiq cron periodiq accepts but cannot honour
    import dramatiq
    from periodiq import cron

    @dramatiq.actor(queue_name="background", periodic=cron("61 * * * *"), actor_name="bad_minute_job")
    def bad_minute_job() -> None:
        pass

    try:
        # Then the scheduler refuses to start, naming the job and the expression
        with pytest.raises(InvalidSchedule, match=r"'bad_minute_job'.*'61 \* \* \* \*'.*minute 61"):
            periodic_jobs(stub_broker, datetime.now(UTC).tzinfo)
    finally:
        del stub_broker.actors["bad_minute_job"]
