"""The transactional outbox: an operation's messages are written with its state change, sent after the
commit, and sent by the relay when the committing process could not (killed after its commit, broker
down); each row is sent once."""

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
from sqlalchemy import event, func, insert, select, update

import middleware.outbox
import middleware.outbox_claims
import middleware.transitions
from jobs.executors import InstanceCreateExecutor
from middleware import ThrottleScope, find_throttle
from middleware.outbox import deliver, relay, send_committed, stage
from middleware.outbox_claims import Claim, claim, claim_key, new_token
from middleware.progress import Outgoing
from middleware.sent_rows import sent_rows
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


def staged_row(operation_id: str, scopes: list[ThrottleScope] | None = None) -> tuple[str, list[Outgoing]]:
    outgoing = [Outgoing(Message("default", "x", (0,), {}, {}))]
    with session_scope() as session:
        row_id = stage(session, operation_id, outgoing, throttle_scopes=scopes or ())
    assert row_id is not None
    return row_id, outgoing


def refuse(*_args: Any, **_kwargs: Any) -> None:
    raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def state_of(instance: Instance) -> State:
    with session_scope() as session:
        return session.scalars(select(Instance.state).where(Instance.id == instance.id)).one()


def test_execute_writes_its_messages_in_the_callers_transaction_and_sends_them_after_commit(stub_broker, cloud):
    instance = make_instance(make_tenant(), volumes=0)
    with session_scope() as session:
        # When a service executes inside its transaction
        InstanceCreateExecutor.execute(session.get_one(Instance, instance.id))
        # Then the messages are in the outbox, in that transaction, and not yet in the broker
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 1
        assert queued(stub_broker) == 0
    # ... and after the commit they are in the broker, the row is deleted (in a batch, from a thread of the
    # process), and the relay does not send them again
    assert queued(stub_broker) == 1
    assert sent_rows.flush()
    assert outbox_rows() == 0
    assert relay(stub_broker, older_than_s=0) == 0
    assert queued(stub_broker) == 1


def row_ids() -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(OutboxMessage.id)))


def test_a_throttled_operations_row_is_marked_sent_by_the_script_that_admits_it(stub_broker, cloud, monkeypatch):
    # Given a throttled operation (a creation holds a provisioning slot) whose row is kept after its send
    instance = make_instance(make_tenant(), volumes=0)
    monkeypatch.setattr(sent_rows, "add", lambda row_id: None)

    # When a service executes it: one call to the throttle admits it and marks its row sent (no claim first, no
    # mark after the send)
    claims = []
    monkeypatch.setattr(middleware.outbox, "claim", lambda *args: claims.append(args))
    monkeypatch.setattr(middleware.outbox, "mark_sent", lambda *args: claims.append(args))
    handle = InstanceCreateExecutor.execute(instance)
    assert claims == []
    [row_id] = row_ids()
    assert get_redis().get(claim_key(row_id)) == "sent"
    assert find_throttle(stub_broker).store.state_of(handle.id) == "granted"
    assert queued(stub_broker) == 1
    monkeypatch.undo()

    # Then the relay deletes the row without sending it again
    assert relay(stub_broker, older_than_s=0) == 0
    assert outbox_rows() == 0
    assert queued(stub_broker) == 1


def test_a_committing_process_that_finds_the_relay_on_its_throttled_row_sends_nothing(stub_broker, cloud):
    # Given a throttled operation's committed row, claimed by the relay while its committing process stalled
    scope = ThrottleScope(f"test:{new_uuid()}", 2)
    row_id, outgoing = staged_row("op-stalled", [scope])
    assert claim(row_id, new_token()) is Claim.TAKEN

    # When the committing process goes on, it neither sends nor touches the throttle
    assert send_committed(stub_broker, row_id, "op-stalled", outgoing, throttle_scopes=[scope]) is False
    assert queued(stub_broker) == 0
    assert find_throttle(stub_broker).store.state_of("op-stalled") is None


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

    # Then the first step is in the broker once (the row was the throttle's from its admission, not the relay's)
    assert len(ours) == 1
    assert queued(stub_broker) == 1
    assert outbox_rows() == 0


def test_a_rolled_back_execute_leaves_nothing_in_the_outbox_or_the_broker(stub_broker, cloud):
    instance = make_instance(make_tenant(), volumes=0)
    with pytest.raises(RuntimeError), session_scope() as session:
        InstanceCreateExecutor.execute(session.get_one(Instance, instance.id))
        raise RuntimeError("the service changed its mind")
    assert outbox_rows() == 0
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
    assert outbox_rows() == 1

    # Then a relay pass while Redis is still down sends nothing and loses nothing
    assert relay(stub_broker, older_than_s=0) == 0
    assert outbox_rows() == 1

    # ... and once Redis is back the relay sends it, and the operation runs to its end
    monkeypatch.undo()
    assert relay(stub_broker, older_than_s=0) == 1
    drain(stub_broker)
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert state_of(instance) == State.OK
    assert outbox_rows() == 0


def test_the_relay_leaves_rows_younger_than_the_grace_period_to_their_committing_process(stub_broker):
    with session_scope() as session:
        row_id = stage(session, "op-young", [Outgoing(Message("default", "x", (), {}, {}))])
    assert relay(stub_broker, older_than_s=60) == 0
    with session_scope() as session:
        session.execute(
            update(OutboxMessage).where(OutboxMessage.id == row_id).values(created_at=utcnow() - timedelta(minutes=2))
        )
    assert relay(stub_broker, older_than_s=60) == 1


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


def test_each_row_is_sent_once_by_concurrent_relays_and_a_late_deliver(database):
    # Given 60 rows left in the outbox
    with session_scope() as session:
        ids = [stage(session, f"op-{n}", [Outgoing(Message("default", "x", (n,), {}, {}))]) for n in range(60)]
    broker = CountingBroker()

    # When four relays run at once, and the committing process's late deliver comes after them
    threads = [threading.Thread(target=relay, args=(broker,), kwargs={"older_than_s": 0}) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    late = [deliver(broker, row_id) for row_id in ids]  # type: ignore[arg-type]

    # Then every message was sent exactly once, and nothing is left
    assert broker.sent == Counter(range(60))
    assert not any(late)
    assert outbox_rows() == 0


def stage_rows(count: int) -> list[tuple[str, list[Outgoing]]]:
    """``count`` committed rows, each with one message carrying its number, as ``execute`` leaves them."""
    rows = []
    with session_scope() as session:
        for n in range(count):
            outgoing = [Outgoing(Message("default", "x", (n,), {}, {}))]
            row_id = stage(session, f"op-{n}", outgoing)
            assert row_id is not None
            rows.append((row_id, outgoing))
    return rows


def test_each_row_is_sent_once_by_committing_processes_racing_relays(database):
    # Given 60 committed rows, each about to be sent by the process that committed it
    rows = stage_rows(60)
    broker = CountingBroker()

    # When those processes send them while four relays run, each relay taking every row it finds
    relays = [threading.Thread(target=relay, args=(broker,), kwargs={"older_than_s": 0}) for _ in range(4)]
    committers = [
        threading.Thread(target=send_committed, args=(broker, row_id, f"op-{n}", outgoing))
        for n, (row_id, outgoing) in enumerate(rows)
    ]
    for thread in relays + committers:
        thread.start()
    for thread in relays + committers:
        thread.join(timeout=60)

    # Then every message was sent exactly once; and once a last relay and the batch deletes are done, nothing
    # is left in the outbox, nor sent again
    relay(broker, older_than_s=0)
    assert sent_rows.flush()
    assert broker.sent == Counter(range(60))
    assert outbox_rows() == 0


def test_a_committing_process_late_past_the_grace_period_finds_its_row_sent_by_the_relay(database):
    # Given a row the relay sent, because its committing process stalled between its commit and its send
    [(row_id, outgoing)] = stage_rows(1)
    broker = CountingBroker()
    assert relay(broker, older_than_s=0) == 1

    # When that process goes on
    assert send_committed(broker, row_id, "op-0", outgoing) is False

    # Then it sends nothing more
    assert broker.sent == Counter([0])


def test_a_row_sent_by_a_process_killed_before_its_delete_is_deleted_unsent_by_the_relay(database, monkeypatch):
    # Given a process that sent its row and marked it sent, and was killed before the batch delete
    [(row_id, outgoing)] = stage_rows(1)
    broker = CountingBroker()
    monkeypatch.setattr(sent_rows, "add", lambda row_id: None)
    assert send_committed(broker, row_id, "op-0", outgoing) is True
    monkeypatch.undo()
    assert outbox_rows() == 1

    # When the relay finds the row
    assert relay(broker, older_than_s=0) == 0

    # Then it deleted the row without sending it again
    assert outbox_rows() == 0
    assert broker.sent == Counter([0])


def test_a_row_claimed_by_a_process_killed_before_its_send_is_sent_by_the_relay_once_the_claim_lapses(
    database, monkeypatch
):
    # Given a process that claimed its row, with a short claim, and was killed before sending it
    monkeypatch.setattr(middleware.outbox_claims, "CLAIM_TTL_MS", 300)
    [(row_id, _outgoing)] = stage_rows(1)
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


def test_execute_writes_its_operation_and_outbox_row_in_one_statement_with_the_commit_on_postgresql(stub_broker):
    # Given an instance, and the database listened to
    instance = make_instance(make_tenant(), volumes=0)

    # When an operation starts in a transaction of the caller's
    with Inserts() as inserts, session_scope() as session:
        handle = InstanceCreateExecutor.execute(session.get(Instance, instance.id))

    # Then PostgreSQL got one statement for both rows, in the round trip of the commit (SQLite, which has no INSERT in
    # WITH, got two statements)
    operations = [s for s in inserts.statements if "INTO operations " in s]
    rows = [s for s in inserts.statements if "INTO outbox " in s]
    if get_engine().dialect.name == "postgresql":
        assert operations == rows and len(rows) == 1
        [with_the_insert] = [trip for trip in inserts.round_trips if any("INTO operations " in s for s in trip)]
        assert with_the_insert[-1] == "COMMIT"
    else:
        assert len(operations) == len(rows) == 1 and operations != rows
    # ... and both rows are whole
    with session_scope() as session:
        operation = session.get(Operation, handle.id)
        assert (operation.status, operation.failed_step, operation.error_message) == ("running", "", "")
        assert session.scalars(select(OutboxMessage.operation_id)).all().count(handle.id) == 1


def test_an_insert_that_leaves_a_column_to_its_default_is_made_apart_from_the_outbox_row(stub_broker):
    # Given an operation's insert that leaves its error columns to the models' defaults
    operation_id = new_uuid()
    partial = {"id": operation_id, "executor": "Probe", "resource_ref": "instance:x", "plan": {}, "status": "running"}
    outgoing = [Outgoing(Message("default", "backend_method", (), {}, {}))]

    # When it is staged along with an outbox row
    with Inserts() as inserts, session_scope() as session:
        stage(session, operation_id, outgoing, along=(insert(Operation.__table__), partial))

    # Then it was its own statement, so the defaults were applied
    assert len(inserts.statements) == 2
    with session_scope() as session:
        operation = session.get(Operation, operation_id)
        assert (operation.failed_step, operation.error_message, operation.created_at is not None) == ("", "", True)


# -- on the project's Redis broker: the admission's answer is read later -------------------------------------


def redis_queued(broker: Any) -> int:
    return broker.client.llen(f"{broker.namespace}:default")


@pytest.fixture
def answers_read_later(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The settler leaves owed replies alone; the rows ``sent_rows`` is given, in order."""
    import resources.replies_later

    monkeypatch.setattr(resources.replies_later, "SETTLE_AFTER_S", 600.0)
    added: list[str] = []
    monkeypatch.setattr(sent_rows, "add", added.append)
    return added


def test_execute_returns_before_the_admissions_answer_which_is_read_later(redis_broker, cloud, answers_read_later):
    # Given a throttled operation on the project's Redis broker
    instance = make_instance(make_tenant(), volumes=0)

    # When a service executes it
    handle = InstanceCreateExecutor.execute(instance)
    [row_id] = row_ids()

    # Then execute() returned without reading Redis's answer: the row is not known to be sent yet
    assert answers_read_later == []

    # When the answer is read, it says the operation was admitted and its first step sent, once, with the admission
    settle_replies()
    assert answers_read_later == [row_id]
    assert redis_queued(redis_broker) == 1
    assert find_throttle(redis_broker).store.state_of(handle.id) == "granted"
    assert get_redis().get(claim_key(row_id)) == "sent"


def test_a_row_the_relay_claimed_before_the_late_read_answer_is_left_to_the_relay(redis_broker, answers_read_later):
    # Given a throttled operation's committed row, claimed by the relay while its committing process stalled
    scope = ThrottleScope(f"test:{new_uuid()}", 2)
    row_id, outgoing = staged_row("op-stalled", [scope])
    assert claim(row_id, new_token()) is Claim.TAKEN

    # When the committing process goes on and its answer is read
    assert send_committed(redis_broker, row_id, "op-stalled", outgoing, throttle_scopes=[scope]) is True
    settle_replies()

    # Then it neither sent nor touched the throttle, and left the row to the relay
    assert answers_read_later == []
    assert redis_queued(redis_broker) == 0
    assert find_throttle(redis_broker).store.state_of("op-stalled") is None


def test_an_admission_sent_ahead_to_a_server_that_lost_its_scripts_is_made_again_when_its_answer_is_read(
    redis_broker, cloud, answers_read_later
):
    # Given a server that lost every script (a restart)
    instance = make_instance(make_tenant(), volumes=0)
    get_redis().script_flush()

    # When a service executes a throttled operation and the answer is read
    handle = InstanceCreateExecutor.execute(instance)
    [row_id] = row_ids()
    settle_replies()

    # Then the admission was made again, the scripts loaded: admitted, its first step sent once, its row done
    assert answers_read_later == [row_id]
    assert redis_queued(redis_broker) == 1
    assert find_throttle(redis_broker).store.state_of(handle.id) == "granted"


def test_an_unthrottled_rows_claim_send_and_mark_go_ahead_and_are_answered_later(redis_broker, answers_read_later):
    # Given a committed row of an operation the throttle does not hold
    row_id, outgoing = staged_row("op-free")

    # When its committing process sends it
    assert send_committed(redis_broker, row_id, "op-free", outgoing) is True

    # Then it did not wait for the answer; once read, the row was claimed, its message stored once, and marked sent
    assert answers_read_later == []
    settle_replies()
    assert answers_read_later == [row_id]
    assert redis_queued(redis_broker) == 1
    assert get_redis().get(claim_key(row_id)) == "sent"
    assert get_redis().keys(f"{get_settings().namespace}:outbox-open:*") == []


def test_an_unthrottled_row_the_relay_had_claimed_is_left_to_it(redis_broker, answers_read_later):
    # Given a committed row the relay claimed while its committing process stalled
    row_id, outgoing = staged_row("op-stalled-free")
    relay_token = new_token()
    assert claim(row_id, relay_token) is Claim.TAKEN

    # When the committing process goes on and its answer is read
    assert send_committed(redis_broker, row_id, "op-stalled-free", outgoing) is True
    settle_replies()

    # Then it stored nothing and left the claim as the relay took it
    assert answers_read_later == []
    assert redis_queued(redis_broker) == 0
    assert get_redis().get(claim_key(row_id)).endswith(relay_token)


def test_an_unthrottled_row_sent_to_a_server_that_lost_its_scripts_is_sent_once_the_usual_way(
    redis_broker, answers_read_later
):
    # Given a server that lost every script (a restart)
    get_redis().script_flush()

    # When a committed row is sent and its answer read
    row_id, outgoing = staged_row("op-lost-scripts")
    send_committed(redis_broker, row_id, "op-lost-scripts", outgoing)
    settle_replies()

    # Then it was sent the usual way, once, and the next row goes ahead again, the scripts loaded
    assert answers_read_later == [row_id]
    assert redis_queued(redis_broker) == 1
    assert get_redis().get(claim_key(row_id)) == "sent"
    next_id, next_outgoing = staged_row("op-after")
    send_committed(redis_broker, next_id, "op-after", next_outgoing)
    settle_replies()
    assert answers_read_later == [row_id, next_id]
    assert redis_queued(redis_broker) == 2


def test_an_unthrottled_rows_store_that_fails_frees_its_claim_for_the_relay(redis_broker, answers_read_later, caplog):
    # Given a queue whose key Redis cannot push to (a string where the list goes)
    queue_key = f"{redis_broker.namespace}:default"
    redis_broker.client.set(queue_key, "not a list")
    row_id, outgoing = staged_row("op-refused")

    # When the row is sent and the answer read
    send_committed(redis_broker, row_id, "op-refused", outgoing)
    settle_replies()

    # Then the row is not taken for sent: its claim is gone, so the relay sends it, and the failure was logged
    assert answers_read_later == []
    assert get_redis().get(claim_key(row_id)) is None
    assert f"outbox row {row_id}" in caplog.text and "not sent yet" in caplog.text
    redis_broker.client.delete(queue_key)
