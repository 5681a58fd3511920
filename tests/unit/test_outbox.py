"""The transactional outbox: an operation's first steps are marked on its row with its state change, and other
messages written to outbox rows; both are sent after the commit, and by the relay when the committing process
could not (killed after its commit, broker down); each is sent once."""

from __future__ import annotations

import re
import tempfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from dramatiq import Message
from sqlalchemy import event, func, select, update

import middleware.outbox
import middleware.outbox_claims
import middleware.transitions
from jobs.executors import InstanceCreateExecutor
from middleware import ThrottleScope, find_throttle
from middleware.outbox import deliver, relay, send_first_steps, stage
from middleware.outbox_claims import Claim, claim, claim_key, new_token
from middleware.plan import PlanBuilder
from middleware.progress import Outgoing, first_steps
from resources.backends import SimulatedConfig
from resources.config import get_settings
from resources.db import get_engine, session_scope
from resources.models import Instance, Operation, OperationStatus, OutboxMessage, new_uuid, utcnow
from resources.redis_client import get_redis, settle_replies
from resources.states import State
from scheduler.janitor import is_alive
from tests.fixtures import drain, make_instance, make_tenant, wait_for


def outbox_rows() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(OutboxMessage)) or 0


def queued(broker: Any) -> int:
    return sum(broker.queues[name].qsize() for name in broker.queues)


def marked_operation(number: int = 0, scopes: list[ThrottleScope] | None = None) -> tuple[str, list[Outgoing]]:
    """A committed running operation of one step whose message carries ``number``, its first steps marked not yet
    known sent, as ``execute()`` leaves it: its id and first steps."""
    operation_id = new_uuid()
    builder = PlanBuilder(operation_id)
    party = builder.add_party("instance:probe", "Probe")
    builder.add_throttle((scope.key, scope.limit) for scope in scopes or ())
    plan = builder.finish(builder.node_for_party(party, Message("default", "x", (number,), {}, {})))
    with session_scope() as session:
        session.add(
            Operation(
                id=operation_id, executor="Probe", resource_ref="instance:probe", plan=plan, first_steps_since=utcnow()
            )
        )
    return operation_id, first_steps(plan)


def marked(operation_id: str) -> bool:
    """Is the operation's row still marked: its first steps not known sent?"""
    with session_scope() as session:
        return session.scalar(select(Operation.first_steps_since).where(Operation.id == operation_id)) is not None


def marked_operations() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).where(Operation.first_steps_since.is_not(None))) or 0


def refuse(*_args: Any, **_kwargs: Any) -> None:
    raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def state_of(instance: Instance) -> State:
    with session_scope() as session:
        return session.scalars(select(Instance.state).where(Instance.id == instance.id)).one()


def test_execute_marks_its_first_steps_in_the_callers_transaction_and_sends_them_after_commit(stub_broker, cloud):
    instance = make_instance(make_tenant(), volumes=0)
    with session_scope() as session:
        # When a service executes inside its transaction
        handle = InstanceCreateExecutor.execute(session.get_one(Instance, instance.id))
        # Then the operation's row, in that transaction, marks its first steps as not yet sent, with no outbox row;
        # and nothing is in the broker yet
        marked_since = session.scalar(select(Operation.first_steps_since).where(Operation.id == handle.id))
        assert marked_since is not None
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
        assert queued(stub_broker) == 0
    # ... and after the commit they are in the broker; the relay does not send them again, and clears the mark
    assert queued(stub_broker) == 1
    assert marked(handle.id)
    assert relay(stub_broker, older_than_s=0) == 0
    assert queued(stub_broker) == 1
    assert not marked(handle.id)


@pytest.mark.parametrize(
    ("failures", "outcome"),
    [({}, OperationStatus.SUCCEEDED), ({"instance.create": 1.0}, OperationStatus.FAILED)],
    ids=["succeeded", "failed"],
)
def test_an_operations_end_clears_its_mark_and_drops_its_claim(stub_broker, stub_worker, cloud, failures, outcome):
    # Given an operation whose first steps were sent by its committing process
    instance = make_instance(make_tenant(), volumes=0)
    cloud.configure(SimulatedConfig(build_ms=5, delete_ms=5, failures=failures))
    handle = InstanceCreateExecutor.execute(instance)
    assert marked(handle.id)
    assert get_redis().get(claim_key(handle.id)) == "sent"

    # When it runs to its end, well or not
    drain(stub_broker)
    assert handle.wait(timeout=30).status == outcome

    # Then its row no longer marks its first steps, and their claim is gone
    assert not marked(handle.id)
    assert get_redis().get(claim_key(handle.id)) is None


def test_a_throttled_operations_claim_is_marked_sent_by_the_script_that_admits_it(stub_broker, cloud, monkeypatch):
    # Given a throttled operation (a creation holds a provisioning slot)
    instance = make_instance(make_tenant(), volumes=0)

    # When a service executes it: one call to the throttle admits it and marks its claim sent (no claim first, no
    # mark after the send)
    claims = []
    monkeypatch.setattr(middleware.outbox, "claim", lambda *args: claims.append(args))
    monkeypatch.setattr(middleware.outbox, "mark_sent", lambda *args: claims.append(args))
    handle = InstanceCreateExecutor.execute(instance)
    assert claims == []
    assert get_redis().get(claim_key(handle.id)) == "sent"
    assert find_throttle(stub_broker).store.state_of(handle.id) == "granted"
    assert queued(stub_broker) == 1
    monkeypatch.undo()

    # Then the relay clears the operation's mark without sending its first steps again
    assert relay(stub_broker, older_than_s=0) == 0
    assert not marked(handle.id)
    assert queued(stub_broker) == 1


def test_a_committing_process_that_finds_the_relay_on_its_throttled_steps_sends_nothing(stub_broker, cloud):
    # Given a throttled operation's committed first steps, claimed by the relay while its committing process stalled
    scope = ThrottleScope(f"test:{new_uuid()}", 2)
    operation_id, outgoing = marked_operation(0, [scope])
    assert claim(operation_id, new_token()) is Claim.TAKEN

    # When the committing process goes on, it neither sends nor touches the throttle
    assert send_first_steps(stub_broker, operation_id, outgoing, throttle_scopes=[scope]) is False
    assert queued(stub_broker) == 0
    assert find_throttle(stub_broker).store.state_of(operation_id) is None


def test_first_steps_admitted_but_refused_by_the_broker_are_sent_once_by_the_throttle(stub_broker, cloud, monkeypatch):
    # Given a throttled operation admitted while the broker refuses its first step
    instance = make_instance(make_tenant(), volumes=0)
    throttle = find_throttle(stub_broker)
    monkeypatch.setattr(stub_broker, "enqueue", refuse)
    handle = InstanceCreateExecutor.execute(instance)
    monkeypatch.undo()
    assert queued(stub_broker) == 0

    # When the relay runs and the throttle's hand-off times out
    assert relay(stub_broker, older_than_s=0) == 0
    later = int(time.time() * 1000) + int(get_settings().throttle_handoff_timeout_s * 1000) + 60_000
    redrives, _handoffs = throttle.store.reap(now_ms=later)
    ours = [redrive for redrive in redrives if redrive.operation_id == handle.id]  # not earlier tests' leftovers
    throttle.send(stub_broker, ours)

    # Then the first step is in the broker once (the steps were the throttle's from its admission, not the relay's)
    assert len(ours) == 1
    assert queued(stub_broker) == 1
    assert not marked(handle.id)


def test_a_rolled_back_execute_leaves_nothing_in_the_database_or_the_broker(stub_broker, cloud):
    instance = make_instance(make_tenant(), volumes=0)
    with pytest.raises(RuntimeError), session_scope() as session:
        InstanceCreateExecutor.execute(session.get_one(Instance, instance.id))
        raise RuntimeError("the service changed its mind")
    assert outbox_rows() == 0
    assert marked_operations() == 0
    assert queued(stub_broker) == 0
    assert state_of(instance) == State.CREATION_SCHEDULED


def test_redis_down_at_execute_keeps_the_commit_and_the_relay_runs_the_operation_later(
    stub_broker, stub_worker, cloud, monkeypatch
):
    # Given Redis refuses connections: the broker and the throttle cannot be reached
    instance = make_instance(make_tenant(), volumes=1)
    throttle = find_throttle(stub_broker)
    assert throttle is not None
    monkeypatch.setattr(stub_broker, "enqueue", refuse)
    monkeypatch.setattr(throttle.store, "acquire", refuse)

    # When a service executes: no error reaches it, and its transaction is committed
    handle = InstanceCreateExecutor.execute(instance)
    assert handle.status() == OperationStatus.RUNNING
    assert state_of(instance) == State.CREATION_SCHEDULED
    assert marked(handle.id)

    # Then a relay pass while Redis is still down sends nothing and loses nothing
    assert relay(stub_broker, older_than_s=0) == 0
    assert marked(handle.id)

    # ... and once Redis is back the relay sends it, and the operation runs to its end
    monkeypatch.undo()
    assert relay(stub_broker, older_than_s=0) == 1
    drain(stub_broker)
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert state_of(instance) == State.OK
    assert not marked(handle.id)
    assert outbox_rows() == 0


def test_a_relay_that_cannot_read_the_claims_sends_nothing_and_loses_nothing(database, monkeypatch):
    # Given a marked operation, and Redis refusing the relay's read of the claims
    operation_id, _outgoing = marked_operation(0)
    broker = CountingBroker()
    monkeypatch.setattr(middleware.outbox, "claim_states", refuse)

    # When the relay runs, it raises nothing, sends nothing, and leaves the mark
    assert relay(broker, older_than_s=0) == 0
    assert marked(operation_id)

    # Then once Redis answers, the next pass sends the steps
    monkeypatch.undo()
    assert relay(broker, older_than_s=0) == 1
    assert broker.sent == Counter([0])


def test_the_relay_leaves_rows_younger_than_the_grace_period_to_their_committing_process(stub_broker):
    with session_scope() as session:
        row_id = stage(session, "op-young", [Outgoing(Message("default", "x", (), {}, {}))])
    assert relay(stub_broker, older_than_s=60) == 0
    with session_scope() as session:
        session.execute(
            update(OutboxMessage).where(OutboxMessage.id == row_id).values(created_at=utcnow() - timedelta(minutes=2))
        )
    assert relay(stub_broker, older_than_s=60) == 1


def test_the_relay_leaves_first_steps_younger_than_the_grace_period_to_their_committing_process(database):
    operation_id, _outgoing = marked_operation(0)
    broker = CountingBroker()
    assert relay(broker, older_than_s=60) == 0
    assert marked(operation_id)
    with session_scope() as session:
        session.execute(
            update(Operation)
            .where(Operation.id == operation_id)
            .values(first_steps_since=utcnow() - timedelta(minutes=2))
        )
    assert relay(broker, older_than_s=60) == 1
    assert broker.sent == Counter([0])
    assert not marked(operation_id)


def test_the_relay_leaves_the_first_steps_of_an_ended_operation_alone(database):
    # Given a marked operation that ended (cancelled) before anything sent its first steps
    operation_id, _outgoing = marked_operation(0)
    with session_scope() as session:
        session.execute(update(Operation).where(Operation.id == operation_id).values(status=OperationStatus.CANCELLED))
    broker = CountingBroker()

    # When the relay runs, it sends nothing
    assert relay(broker, older_than_s=0) == 0
    assert broker.sent == Counter()


class CountingBroker:
    """Just enough of a broker for the outbox: counts what it is asked to enqueue."""

    middleware: list[Any] = []

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: Counter[int] = Counter()

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        with self.lock:
            self.sent[message.args[0]] += 1
        return message


def run_together(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)


def test_each_row_is_sent_once_by_concurrent_relays_and_a_late_deliver(database):
    # Given 60 rows left in the outbox
    with session_scope() as session:
        ids = [stage(session, f"op-{n}", [Outgoing(Message("default", "x", (n,), {}, {}))]) for n in range(60)]
    broker = CountingBroker()

    # When four relays run at once, and the committing process's late deliver comes after them
    run_together(*(threading.Thread(target=relay, args=(broker,), kwargs={"older_than_s": 0}) for _ in range(4)))
    late = [deliver(broker, row_id) for row_id in ids]  # type: ignore[arg-type]

    # Then every message was sent exactly once, and nothing is left
    assert broker.sent == Counter(range(60))
    assert not any(late)
    assert outbox_rows() == 0


def test_each_operations_first_steps_are_sent_once_by_concurrent_relays_and_a_late_committing_process(database):
    # Given 60 operations whose committing processes stalled before sending their first steps
    operations = [marked_operation(n) for n in range(60)]
    broker = CountingBroker()

    # When four relays run at once, and the committing processes go on after them
    run_together(*(threading.Thread(target=relay, args=(broker,), kwargs={"older_than_s": 0}) for _ in range(4)))
    late = [send_first_steps(broker, operation_id, outgoing) for operation_id, outgoing in operations]

    # Then every first step was sent exactly once, and no mark is left
    assert broker.sent == Counter(range(60))
    assert not any(late)
    assert marked_operations() == 0


def test_each_operations_first_steps_are_sent_once_by_committing_processes_racing_relays(database):
    # Given 60 committed operations, each about to have its first steps sent by the process that committed it
    operations = [marked_operation(n) for n in range(60)]
    broker = CountingBroker()

    # When those processes send them while four relays run, each relay taking every operation it finds
    run_together(
        *(threading.Thread(target=relay, args=(broker,), kwargs={"older_than_s": 0}) for _ in range(4)),
        *(threading.Thread(target=send_first_steps, args=(broker, *operation)) for operation in operations),
    )

    # Then every first step was sent exactly once; and once a last relay is done, no mark is left, and nothing was
    # sent again
    relay(broker, older_than_s=0)
    assert broker.sent == Counter(range(60))
    assert marked_operations() == 0


def test_a_committing_process_late_past_the_grace_period_finds_its_steps_sent_by_the_relay(database):
    # Given first steps the relay sent, because their committing process stalled between its commit and its send
    operation_id, outgoing = marked_operation(0)
    broker = CountingBroker()
    assert relay(broker, older_than_s=0) == 1

    # When that process goes on
    assert send_first_steps(broker, operation_id, outgoing) is False

    # Then it sends nothing more
    assert broker.sent == Counter([0])


def test_first_steps_sent_by_a_process_killed_after_its_send_are_not_sent_again_by_the_relay(database):
    # Given a process that sent its operation's first steps and marked their claim sent, then was killed
    operation_id, outgoing = marked_operation(0)
    broker = CountingBroker()
    assert send_first_steps(broker, operation_id, outgoing) is True
    assert marked(operation_id)

    # When the relay finds the operation still marked
    assert relay(broker, older_than_s=0) == 0

    # Then it cleared the mark without sending the steps again
    assert not marked(operation_id)
    assert broker.sent == Counter([0])


def test_first_steps_claimed_by_a_process_killed_before_its_send_are_sent_by_the_relay_once_the_claim_lapses(
    database, monkeypatch
):
    # Given a process that claimed its operation's first steps, with a short claim, and was killed before sending
    monkeypatch.setattr(middleware.outbox_claims, "CLAIM_TTL_MS", 300)
    operation_id, _outgoing = marked_operation(0)
    broker = CountingBroker()
    assert claim(operation_id, new_token()) is Claim.TAKEN

    # When the relay runs while the claim holds, it leaves the steps to their claimant
    assert relay(broker, older_than_s=0) == 0
    assert marked(operation_id)

    # Then once the claim has lapsed, the relay sends them, once
    wait_for(lambda: relay(broker, older_than_s=0) == 1, timeout_s=10)
    assert broker.sent == Counter([0])
    assert not marked(operation_id)


def test_a_row_claimed_by_a_process_killed_before_its_send_is_sent_by_the_relay_once_the_claim_lapses(
    database, monkeypatch
):
    # Given a row whose sender claimed it, with a short claim, and was killed before sending it
    monkeypatch.setattr(middleware.outbox_claims, "CLAIM_TTL_MS", 300)
    with session_scope() as session:
        row_id = stage(session, "op-0", [Outgoing(Message("default", "x", (0,), {}, {}))])
    assert row_id is not None
    broker = CountingBroker()
    assert claim(row_id, new_token()) is Claim.TAKEN

    # When the relay runs while the claim holds, it leaves the row to its claimant
    assert relay(broker, older_than_s=0) == 0
    assert outbox_rows() == 1

    # Then once the claim has lapsed, the relay sends the row, once
    wait_for(lambda: relay(broker, older_than_s=0) == 1, timeout_s=10)
    assert broker.sent == Counter([0])
    assert outbox_rows() == 0


def test_failure_callbacks_committed_with_the_failure_survive_a_crash_before_their_send(
    stub_broker, stub_worker, cloud, monkeypatch
):
    # Given a create whose backend call fails for good, on a worker that dies before sending the
    # failure callbacks it committed with the failure
    instance = make_instance(make_tenant(), volumes=0)
    cloud.configure(SimulatedConfig(build_ms=40, delete_ms=20, failures={"instance.create": 1.0}))
    real_deliver = middleware.transitions.deliver

    def die_after_failing(broker: Any, row_id: str | None, operation_id: str = "?") -> bool:
        with session_scope() as session:
            failed = session.get_one(Operation, operation_id).status == OperationStatus.FAILED
        return False if failed else real_deliver(broker, row_id, operation_id)

    monkeypatch.setattr(middleware.transitions, "deliver", die_after_failing)
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    assert handle.status() == OperationStatus.FAILED
    assert state_of(instance) == State.CREATING  # the callback that moves it to ERRED was not sent

    # When the relay runs
    monkeypatch.undo()
    assert relay(stub_broker, older_than_s=0) == 1
    drain(stub_broker)

    # Then the failure callback ran: the resource is ERRED, with the backend's error
    assert state_of(instance) == State.ERRED


def test_the_janitor_counts_an_operation_waiting_in_the_outbox_as_alive(stub_broker, cloud, monkeypatch):
    instance = make_instance(make_tenant(), volumes=0)
    throttle = find_throttle(stub_broker)
    assert throttle is not None
    monkeypatch.setattr(stub_broker, "enqueue", refuse)
    monkeypatch.setattr(throttle.store, "acquire", refuse)
    handle = InstanceCreateExecutor.execute(instance)
    monkeypatch.undo()
    assert is_alive(stub_broker, handle.id)


class Inserts:
    """The INSERT statements (with their WITH queries) the database gets while it listens, from the driver: on
    SQLite its trace callback, on PostgreSQL libpq's trace of what goes over the wire (some statements skip
    SQLAlchemy's events: ``resources.quick_statements``, ``resources.pg_piggyback.defer_write``). On PostgreSQL it
    also tells the round trips apart: each ends with the server's ReadyForQuery."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        #: On PostgreSQL, the statements sent in each round trip.
        self.round_trips: list[list[str]] = []
        self._sqlite = get_engine().dialect.name == "sqlite"
        self._trace = tempfile.NamedTemporaryFile(suffix=".trace", delete=False)  # noqa: SIM115

    def _seen(self, statement: str) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "WITH")):
            self.statements.append(" ".join(statement.split()))

    def _on_checkout(self, dbapi_connection: Any, *_rest: Any) -> None:
        if self._sqlite:
            dbapi_connection.set_trace_callback(self._seen)
        else:
            dbapi_connection.pgconn.trace(self._trace.fileno())
            dbapi_connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

    def _on_checkin(self, dbapi_connection: Any, *_rest: Any) -> None:
        if self._sqlite:
            dbapi_connection.set_trace_callback(None)
        else:
            dbapi_connection.pgconn.untrace()

    def __enter__(self) -> Inserts:
        event.listen(get_engine(), "checkout", self._on_checkout)
        event.listen(get_engine(), "checkin", self._on_checkin)
        return self

    def __exit__(self, *_exc: Any) -> None:
        event.remove(get_engine(), "checkout", self._on_checkout)
        event.remove(get_engine(), "checkin", self._on_checkin)
        self._trace.close()
        # One message per line, but a statement's text may run over several lines.
        trip: list[str] = []
        for message in re.split(r"\n(?=[FB]\t)", Path(self._trace.name).read_text()):
            fields = message.split("\t", 3)
            if len(fields) < 4:
                continue
            direction, _length, kind, text = fields
            if direction == "F" and kind in ("Parse", "Query"):
                statement = text.split('"', 3 if kind == "Parse" else 1)[-1].rsplit('"', 1)[0]
                self._seen(statement)
                trip.append(statement)
            elif direction == "B" and kind == "ReadyForQuery":
                self.round_trips.append(trip)
                trip = []
        Path(self._trace.name).unlink()


def test_execute_writes_its_operation_alone_with_the_commit_on_postgresql(stub_broker):
    # Given an instance, and the database listened to
    instance = make_instance(make_tenant(), volumes=0)

    # When an operation starts in a transaction of the caller's
    with Inserts() as inserts, session_scope() as session:
        handle = InstanceCreateExecutor.execute(session.get(Instance, instance.id))

    # Then the database got one insert, of the operation's row, and no outbox row; on PostgreSQL in the round trip of
    # the commit
    assert [s for s in inserts.statements if "INTO operations " in s] == inserts.statements
    assert len(inserts.statements) == 1
    if get_engine().dialect.name == "postgresql":
        [with_the_insert] = [trip for trip in inserts.round_trips if any("INTO operations " in s for s in trip)]
        assert with_the_insert[-1] == "COMMIT"
    # ... and the row is whole, its first steps marked
    with session_scope() as session:
        operation = session.get(Operation, handle.id)
        assert (operation.status, operation.failed_step, operation.error_message) == ("running", "", "")
        assert operation.first_steps_since == operation.created_at
        assert operation.first_steps_delay_ms is None


def test_a_countdown_is_kept_with_the_mark_and_the_relay_delays_the_first_steps_by_it(stub_broker, cloud, monkeypatch):
    # Given an operation started with a countdown while the broker refuses its first steps
    instance = make_instance(make_tenant(), volumes=0)
    throttle = find_throttle(stub_broker)
    monkeypatch.setattr(stub_broker, "enqueue", refuse)
    monkeypatch.setattr(throttle.store, "acquire", refuse)
    handle = InstanceCreateExecutor.execute(instance, countdown=30)
    monkeypatch.undo()
    with session_scope() as session:
        assert session.get_one(Operation, handle.id).first_steps_delay_ms == 30_000

    # When the relay sends them
    delays: list[int | None] = []
    monkeypatch.setattr(
        middleware.outbox, "enqueue_all", lambda broker, outgoing: delays.extend(item.delay for item in outgoing)
    )
    monkeypatch.setattr(
        throttle,
        "submit",
        lambda broker, operation_id, scopes, outgoing: delays.extend(item.delay for item in outgoing),
    )
    assert relay(stub_broker, older_than_s=0) == 1

    # Then they keep the countdown they were started with
    assert delays == [30_000]


# -- on the project's Redis broker: the answer of the first steps' send is read later --------------------------------


def redis_queued(broker: Any) -> int:
    return broker.client.llen(f"{broker.namespace}:default")


def owed_here() -> int:
    """Replies this thread's Redis connection has not read yet."""
    line = get_redis()._own.line  # type: ignore[attr-defined]
    return sum(owed.count for owed in line.owed) if line is not None else 0


@pytest.fixture
def answers_read_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settler leaves owed replies alone."""
    import resources.replies_later

    monkeypatch.setattr(resources.replies_later, "SETTLE_AFTER_S", 600.0)


def test_execute_returns_before_the_admissions_answer_which_is_read_later(redis_broker, cloud, answers_read_later):
    # Given a throttled operation on the project's Redis broker
    instance = make_instance(make_tenant(), volumes=0)

    # When a service executes it
    handle = InstanceCreateExecutor.execute(instance)

    # Then execute() returned without reading Redis's answer
    assert owed_here() > 0

    # When the answer is read, it says the operation was admitted and its first step sent, once, with the admission
    settle_replies()
    assert owed_here() == 0
    assert redis_queued(redis_broker) == 1
    assert find_throttle(redis_broker).store.state_of(handle.id) == "granted"
    assert get_redis().get(claim_key(handle.id)) == "sent"


def test_first_steps_the_relay_claimed_before_the_late_read_answer_are_left_to_the_relay(
    redis_broker, answers_read_later
):
    # Given a throttled operation's committed first steps, claimed by the relay while its committing process stalled
    scope = ThrottleScope(f"test:{new_uuid()}", 2)
    operation_id, outgoing = marked_operation(0, [scope])
    relay_token = new_token()
    assert claim(operation_id, relay_token) is Claim.TAKEN

    # When the committing process goes on and its answer is read
    assert send_first_steps(redis_broker, operation_id, outgoing, throttle_scopes=[scope]) is True
    settle_replies()

    # Then it neither sent nor touched the throttle, and left the claim as the relay took it
    assert redis_queued(redis_broker) == 0
    assert find_throttle(redis_broker).store.state_of(operation_id) is None
    assert get_redis().get(claim_key(operation_id)).endswith(relay_token)


def test_an_admission_sent_ahead_to_a_server_that_lost_its_scripts_is_made_again_when_its_answer_is_read(
    redis_broker, cloud, answers_read_later
):
    # Given a server that lost every script (a restart)
    instance = make_instance(make_tenant(), volumes=0)
    get_redis().script_flush()

    # When a service executes a throttled operation and the answer is read
    handle = InstanceCreateExecutor.execute(instance)
    settle_replies()

    # Then the admission was made again, the scripts loaded: admitted, its first step sent once, its claim marked sent
    assert redis_queued(redis_broker) == 1
    assert find_throttle(redis_broker).store.state_of(handle.id) == "granted"
    assert get_redis().get(claim_key(handle.id)) == "sent"


def test_unthrottled_first_steps_claim_send_and_mark_go_ahead_and_are_answered_later(redis_broker, answers_read_later):
    # Given the committed first steps of an operation the throttle does not hold
    operation_id, outgoing = marked_operation(0)

    # When its committing process sends them
    assert send_first_steps(redis_broker, operation_id, outgoing) is True

    # Then it did not wait for the answer; once read, the steps were claimed, stored once, and the claim marked sent
    assert owed_here() > 0
    settle_replies()
    assert redis_queued(redis_broker) == 1
    assert get_redis().get(claim_key(operation_id)) == "sent"
    assert get_redis().keys(f"{get_settings().namespace}:outbox-open:*") == []


def test_unthrottled_first_steps_the_relay_had_claimed_are_left_to_it(redis_broker, answers_read_later):
    # Given committed first steps the relay claimed while their committing process stalled
    operation_id, outgoing = marked_operation(0)
    relay_token = new_token()
    assert claim(operation_id, relay_token) is Claim.TAKEN

    # When the committing process goes on and its answer is read
    assert send_first_steps(redis_broker, operation_id, outgoing) is True
    settle_replies()

    # Then it stored nothing and left the claim as the relay took it
    assert redis_queued(redis_broker) == 0
    assert get_redis().get(claim_key(operation_id)).endswith(relay_token)


def test_unthrottled_first_steps_sent_to_a_server_that_lost_its_scripts_are_sent_once_the_usual_way(
    redis_broker, answers_read_later
):
    # Given a server that lost every script (a restart)
    get_redis().script_flush()

    # When committed first steps are sent and their answer read
    operation_id, outgoing = marked_operation(0)
    send_first_steps(redis_broker, operation_id, outgoing)
    settle_replies()

    # Then they were sent the usual way, once, and the next operation's go ahead again, the scripts loaded
    assert redis_queued(redis_broker) == 1
    assert get_redis().get(claim_key(operation_id)) == "sent"
    next_id, next_outgoing = marked_operation(1)
    send_first_steps(redis_broker, next_id, next_outgoing)
    assert owed_here() > 0
    settle_replies()
    assert redis_queued(redis_broker) == 2
    assert get_redis().get(claim_key(next_id)) == "sent"


def test_unthrottled_first_steps_whose_store_fails_free_their_claim_for_the_relay(
    redis_broker, answers_read_later, caplog
):
    # Given a queue whose key Redis cannot push to (a string where the list goes)
    queue_key = f"{redis_broker.namespace}:default"
    redis_broker.client.set(queue_key, "not a list")
    operation_id, outgoing = marked_operation(0)

    # When the steps are sent and the answer read
    send_first_steps(redis_broker, operation_id, outgoing)
    settle_replies()

    # Then they are not taken for sent: their claim is gone, so the relay sends them, and the failure was logged
    assert get_redis().get(claim_key(operation_id)) is None
    assert f"first steps of operation {operation_id}" in caplog.text and "not sent yet" in caplog.text
    redis_broker.client.delete(queue_key)
