"""Step chaining: a worker runs an operation's next step itself, records each step as it completes, and a
crash, a cancel, a failure or a retry in the middle of a chain loses nothing and runs no recorded step
again."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import dramatiq
import pytest
from dramatiq import Message
from dramatiq.middleware import Middleware
from sqlalchemy import exc as sql_errors
from sqlalchemy import select

from jobs import queues
from jobs.executors import BaseExecutor
from jobs.executors.base import Signature
from jobs.executors.throttling import provisioning_scope
from middleware import OperationTransitions, StepMarks, ThrottleScope, current_step, end_operation, find_throttle
from middleware.plan import OPTION_NODE
from middleware.progress import complete_step, pending_after
from middleware.transient import retry_transient
from resources.db import session_scope
from resources.logs import current_log_fields
from resources.models import Operation, OperationStatus, Resource, StepDone
from tests.fixtures import drain, make_instance, make_tenant, wait_for

ran: list[tuple[str, str | None]] = []
#: The throttle grant each step ran under, by label.
fences: dict[str, int | None] = {}
ran_lock = threading.Lock()
blipped: set[str] = set()
#: Whether the first copy of a "twin" step has started.
twin_started = [False]
#: Set once the second completion of a "twin_recorded" step has been handled.
late_copy_handled = threading.Event()
#: What the database and Redis's marks had recorded of its operation when a "look" step ran.
seen_done: list[set[str]] = []
#: What the database alone had recorded then.
seen_in_database: list[set[str]] = []


@dramatiq.actor(queue_name=queues.DEFAULT, retry_when=retry_transient, min_backoff=10, max_backoff=10)
def chain_probe(label: str, behaviour: str = "") -> None:
    """One step: notes that it ran (with the plan node it ran as), then does what ``behaviour`` says."""
    with ran_lock:
        ran.append((label, current_step().node))
        fences[label] = current_step().throttle_fence
    if behaviour == "cancel":
        operation_id = current_step().operation_id or ""
        end_operation(dramatiq.get_broker(), operation_id, "chain_probe", "by a test", status=OperationStatus.CANCELLED)
    elif behaviour == "fail":
        raise ValueError(f"step {label} fails for good")
    elif behaviour == "look":
        seen_done.append(recorded_paths(current_step().operation_id or ""))
        seen_in_database.append(done_paths(current_step().operation_id or ""))
    elif behaviour == "twin":
        # Two copies of this step run side by side: the one that started first finishes only once the other
        # has run the whole operation to its end.
        with ran_lock:
            waits, twin_started[0] = not twin_started[0], True
        if waits:
            operation_id = current_step().operation_id or ""
            wait_for(lambda: operation_status(operation_id) != OperationStatus.RUNNING, timeout_s=30)
    elif behaviour == "twin_recorded":
        # Two copies of this step run side by side: the one that started first finishes only once the other's
        # completion is in the database.
        with ran_lock:
            waits, twin_started[0] = not twin_started[0], True
        if waits:
            operation_id = current_step().operation_id or ""
            wait_for(lambda: "0" in done_paths(operation_id), timeout_s=30)
    elif behaviour == "hold":
        # Runs on once the late copy of the first step has been handled (see twin_recorded).
        assert late_copy_handled.wait(timeout=30)
    elif behaviour == "blip" and label not in blipped:
        blipped.add(label)
        raise sql_errors.OperationalError("UPDATE ...", {}, Exception("database is locked"))


class SequenceExecutor(BaseExecutor):
    """Steps in sequence, one per entry of ``behaviours``; the last may go to ``last_queue``."""

    required_options = frozenset({"behaviours"})
    options = frozenset({"last_queue", "last_delay_ms"})

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        messages = [chain_probe.message(f"s{i}", b) for i, b in enumerate(kwargs["behaviours"])]
        if kwargs.get("last_queue"):
            messages[-1] = messages[-1].copy(queue_name=kwargs["last_queue"])
        if kwargs.get("last_delay_ms"):
            last = len(messages) - 1
            messages[-1] = chain_probe.message_with_options(args=(f"s{last}",), delay=kwargs["last_delay_ms"])
        return messages


class ThrottledExecutor(BaseExecutor):
    """Three steps in sequence, or (``grouped``) a group of two sequences of two, holding a provisioning slot."""

    options = frozenset({"grouped"})

    @classmethod
    def throttle_scopes(cls, instance: Resource, **kwargs: Any) -> Sequence[ThrottleScope]:
        return [provisioning_scope(instance)]

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        if kwargs.get("grouped"):
            return dramatiq.group(
                [
                    [chain_probe.message("a0"), chain_probe.message("a1")],
                    [chain_probe.message("b0"), chain_probe.message("b1")],
                ]
            )
        return [chain_probe.message(f"s{i}") for i in range(3)]


class CountEnqueues(Middleware):
    def __init__(self) -> None:
        self.sent: list[str] = []

    def after_enqueue(self, broker: Any, message: Message[Any], delay: int | None) -> None:
        if message.actor_name == chain_probe.actor_name:
            self.sent.append(message.args[0])


@pytest.fixture
def enqueues(stub_broker: Any) -> Any:
    ran.clear()
    fences.clear()
    blipped.clear()
    twin_started[0] = False
    late_copy_handled.clear()
    seen_done.clear()
    seen_in_database.clear()
    counter = CountEnqueues()
    stub_broker.add_middleware(counter)
    yield counter
    stub_broker.middleware.remove(counter)


def done_paths(operation_id: str) -> set[str]:
    """The steps the database has recorded."""
    with session_scope() as session:
        return set(session.scalars(select(StepDone.path).where(StepDone.operation_id == operation_id)))


def operation_status(operation_id: str) -> str:
    with session_scope() as session:
        return session.scalars(select(Operation.status).where(Operation.id == operation_id)).one()


def done_times(operation_id: str) -> dict[str, Any]:
    with session_scope() as session:
        rows = session.execute(select(StepDone.path, StepDone.done_at).where(StepDone.operation_id == operation_id))
        return {path: done_at for path, done_at in rows}


def recorded_paths(operation_id: str) -> set[str]:
    """The steps recorded in the database or marked in Redis: what a redelivered step's check goes by."""
    return done_paths(operation_id) | set(StepMarks().paths(operation_id))


def labels() -> list[str]:
    return [label for label, _node in ran]


def test_a_sequence_runs_as_one_delivery_with_every_step_recorded(stub_broker, enqueues, stub_worker):
    # Given a five-step sequence
    instance = make_instance(make_tenant(), volumes=0)

    # When it runs
    handle = SequenceExecutor.execute(instance, behaviours=[""] * 5)
    drain(stub_broker)

    # Then only its first step went through the broker, every step ran once as its own plan node, and all
    # of them are in the database, each with the time it completed, and none is left marked in Redis
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert enqueues.sent == ["s0"]
    assert labels() == ["s0", "s1", "s2", "s3", "s4"]
    assert [node for _label, node in ran] == ["0", "1", "2", "3", "4"]
    assert {"0", "1", "2", "3", "4", ""} <= done_paths(handle.id)
    completed_at = done_times(handle.id)
    assert [completed_at[p] for p in "01234"] == sorted(completed_at[p] for p in "01234")
    assert StepMarks().paths(handle.id) == {}


def test_a_chains_last_step_records_the_marks_it_knows_without_reading_them_again(
    stub_broker, enqueues, stub_worker, monkeypatch
):
    # Given a count of the reads of an operation's marks from Redis
    reads: list[str] = []
    read = StepMarks.paths
    monkeypatch.setattr(
        StepMarks, "paths", lambda self, operation_id: reads.append(operation_id) or read(self, operation_id)
    )

    # When a five-step sequence runs as one chain
    handle = SequenceExecutor.execute(make_instance(make_tenant(), volumes=0), behaviours=[""] * 5)
    drain(stub_broker)

    # Then its marks were read once, by the first step's check: the last step recorded the marks its chain made,
    # every step is in the database with the time its mark gave it, and no mark is left
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert reads == [handle.id]
    assert {"0", "1", "2", "3", "4", ""} <= done_paths(handle.id)
    completed_at = done_times(handle.id)
    assert [completed_at[p] for p in "01234"] == sorted(completed_at[p] for p in "01234")
    assert StepMarks().paths(handle.id) == {}


def test_a_chained_step_is_marked_in_redis_not_written_to_the_database(stub_broker, enqueues, stub_worker):
    # Given a sequence whose third step looks at what is recorded
    instance = make_instance(make_tenant(), volumes=0)

    # When it runs
    handle = SequenceExecutor.execute(instance, behaviours=["", "", "look", ""])
    drain(stub_broker)

    # Then the two steps before it were marked in Redis, and the database had none of them yet: a chained
    # step costs no write transaction
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert seen_in_database == [set()]
    assert len(seen_done) == 1 and {"0", "1"} == seen_done[0]


def test_each_chained_step_is_recorded_before_the_next_one_runs(stub_broker, enqueues, stub_worker):
    # Given a sequence whose fourth step looks at what is recorded
    instance = make_instance(make_tenant(), volumes=0)

    # When it runs
    handle = SequenceExecutor.execute(instance, behaviours=["", "", "", "look", ""])
    drain(stub_broker)

    # Then the three steps before it were recorded by then: a crash there runs none of them again (a
    # volume deleted by one step and deleted again would fail the operation)
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert enqueues.sent == ["s0"]
    assert len(seen_done) == 1 and {"0", "1", "2"} <= seen_done[0] and "3" not in seen_done[0]


class SeeLogFields(Middleware):
    """Notes, in its after-hook, the message id of the log fields each chain_probe message's lines carry.
    Added before OperationTransitions, so that hook runs after the one that runs a chain."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def after_process_message(self, broker: Any, message: Message[Any], **_outcome: Any) -> None:
        if message.actor_name == chain_probe.actor_name:
            self.seen.append((message.message_id, current_log_fields().message_id))


def test_after_a_chain_the_delivered_messages_hooks_log_with_its_own_fields(stub_broker, enqueues, stub_worker):
    # Given a middleware whose after-hook runs after the one that runs a chain
    see = SeeLogFields()
    stub_broker.add_middleware(see, before=OperationTransitions)
    try:
        # When a three-step sequence runs as one delivery
        handle = SequenceExecutor.execute(make_instance(make_tenant(), volumes=0), behaviours=[""] * 3)
        drain(stub_broker)
    finally:
        stub_broker.middleware.remove(see)

    # Then every step's after-hooks logged with that step's fields, the delivered one's too once the chain
    # it started had ended (the chained steps' hooks had cleared the thread's fields)
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert enqueues.sent == ["s0"]
    assert len(see.seen) == 3
    assert all(own == logged for own, logged in see.seen)


def test_without_chaining_every_step_goes_through_the_broker(stub_broker, unchained, enqueues, stub_worker):
    instance = make_instance(make_tenant(), volumes=0)
    handle = SequenceExecutor.execute(instance, behaviours=[""] * 5)
    drain(stub_broker)
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert enqueues.sent == ["s0", "s1", "s2", "s3", "s4"]


def test_a_step_for_another_queue_is_sent_to_it(stub_broker, enqueues, stub_worker):
    # Given a sequence whose last step belongs to the heavy queue
    instance = make_instance(make_tenant(), volumes=0)

    # When it runs
    handle = SequenceExecutor.execute(instance, behaviours=[""] * 3, last_queue=queues.HEAVY)
    drain(stub_broker)

    # Then that step went through the broker, to its queue's workers
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert enqueues.sent == ["s0", "s2"]


def test_a_step_with_a_delay_is_sent_to_wait_in_the_broker(stub_broker, enqueues, stub_worker):
    # Given a sequence whose last step is to start 50 ms after the one before it
    instance = make_instance(make_tenant(), volumes=0)

    # When it runs
    handle = SequenceExecutor.execute(instance, behaviours=[""] * 3, last_delay_ms=50)
    drain(stub_broker)

    # Then that step was sent (the stub broker moves a delayed message from its delay queue: two enqueues)
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert enqueues.sent[:2] == ["s0", "s2"] and "s1" not in enqueues.sent


def test_a_chain_stops_at_its_time_budget(stub_broker, enqueues, stub_worker, monkeypatch):
    # Given a chain budget already spent when the first chained step ends
    transitions = next(m for m in stub_broker.middleware if isinstance(m, OperationTransitions))
    monkeypatch.setattr(transitions.chain, "budget_s", 1e-9)

    # When a four-step sequence runs
    handle = SequenceExecutor.execute(make_instance(make_tenant(), volumes=0), behaviours=[""] * 4)
    drain(stub_broker)

    # Then each chain ran one step after its delivered one before sending the next through the broker
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert enqueues.sent == ["s0", "s2"]


def record(operation_id: str, path: str, where: str) -> None:
    """Record step ``path`` as a worker does: in the database, or marked in Redis by a chain."""
    if where == "database":
        with session_scope() as session:
            complete_step(session, operation_id, path)
    else:
        assert StepMarks().record(operation_id, path)


@pytest.mark.parametrize("where", ["database", "redis"])
def test_a_redelivered_step_sends_the_first_step_its_chain_did_not_record(stub_broker, enqueues, request, where):
    # Given a five-step operation whose worker recorded step 0, then steps 1 and 2 that it chained (in the
    # database, or as marks in Redis), and was killed during step 3, its first message unacknowledged (no
    # worker has consumed anything yet)
    instance = make_instance(make_tenant(), volumes=0)
    handle = SequenceExecutor.execute(instance, behaviours=[""] * 5)
    first = Message.decode(stub_broker.queues[queues.DEFAULT].get_nowait())
    stub_broker.queues[queues.DEFAULT].task_done()
    for path in (first.options[OPTION_NODE], "1", "2"):
        record(handle.id, path, where)

    # When the broker delivers that first message again
    request.getfixturevalue("stub_worker")
    stub_broker.enqueue(first)
    drain(stub_broker)

    # Then the operation went on from step 3, no recorded step ran again, and the database has every step
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert labels() == ["s3", "s4"]
    assert {"0", "1", "2", "3", "4", ""} <= done_paths(handle.id)


@pytest.fixture(params=["in-flight set", "database"])
def ended_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How a delivered step that marked itself learns that its operation still runs: its in-flight set is there
    on the marks' server, or (without that set there) the database says."""
    if request.param == "database":
        monkeypatch.setattr(OperationTransitions, "_alive_key", lambda self, broker, operation_id: None)
    return request.param


def run_two_copies_of_the_first_step(stub_broker: Any, request: pytest.FixtureRequest, behaviours: list[str]) -> Any:
    """Start a sequence whose first message is in the queue twice (its outbox row sent twice: a sender killed between
    its send and its mark), then run it on a worker; its handle."""
    handle = SequenceExecutor.execute(make_instance(make_tenant(), volumes=0), behaviours=behaviours)
    first = Message.decode(stub_broker.queues[queues.DEFAULT].get_nowait())
    stub_broker.queues[queues.DEFAULT].task_done()
    stub_broker.enqueue(first)
    stub_broker.enqueue(first)
    request.getfixturevalue("stub_worker")
    drain(stub_broker)
    return handle


def test_a_copy_of_a_step_finishing_after_its_operation_ended_starts_nothing(stub_broker, enqueues, request, ended_by):
    # Given two copies of an operation's first step in the queue, the first to start finishing only after the other
    # ran the operation; when both run
    handle = run_two_copies_of_the_first_step(stub_broker, request, ["twin", "", ""])

    # Then the late copy's completion started nothing: the steps after it ran once, and no mark is left
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert sorted(labels()) == ["s0", "s0", "s1", "s2"]
    assert StepMarks().paths(handle.id) == {}


def test_a_copy_finishing_after_another_was_recorded_without_chaining_starts_nothing(
    stub_broker, enqueues, request, ended_by, monkeypatch
):
    # Given two copies of an operation's first step in the queue, the first to start finishing only once the
    # other's completion is in the database, that other not running the next step itself (its chain budget
    # spent, say) but sending it, and the operation still running when the late copy finishes; when both run
    real_chained_next, real_record = OperationTransitions._chained_next, OperationTransitions._record_success
    completions = []

    def first_completion_unchained(self: Any, broker: Any, message: Message[Any], path: str) -> Any:
        completions.append(path)
        return None if path == "0" and completions.count("0") == 1 else real_chained_next(self, broker, message, path)

    def noting_the_late_copy(
        self: Any, broker: Any, message: Message[Any], operation_id: str, path: str, *a: Any
    ) -> Any:
        try:
            return real_record(self, broker, message, operation_id, path, *a)
        finally:
            if path == "0" and completions.count("0") == 2:
                late_copy_handled.set()

    monkeypatch.setattr(OperationTransitions, "_chained_next", first_completion_unchained)
    monkeypatch.setattr(OperationTransitions, "_record_success", noting_the_late_copy)
    handle = run_two_copies_of_the_first_step(stub_broker, request, ["twin_recorded", "hold", ""])

    # Then the late copy found the step taken and started nothing: the steps after it ran once
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert late_copy_handled.is_set()
    assert sorted(labels()) == ["s0", "s0", "s1", "s2"]


def test_a_delivered_step_marked_while_its_operation_runs_goes_on_without_a_read(
    stub_broker, enqueues, stub_worker, monkeypatch
):
    # Given a count of the database reads a delivered step makes after its mark
    reads = []
    real = OperationTransitions._still_to_record
    monkeypatch.setattr(
        OperationTransitions, "_still_to_record", lambda self, *args: reads.append(args) or real(self, *args)
    )

    # When a three-step sequence runs
    handle = SequenceExecutor.execute(make_instance(make_tenant(), volumes=0), behaviours=[""] * 3)
    drain(stub_broker)

    # Then its first step's mark, made while the operation's in-flight set was there, was enough: no read
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert labels() == ["s0", "s1", "s2"]
    assert reads == []


def test_a_database_blip_after_a_step_was_marked_is_retried_and_the_chain_goes_on(
    stub_broker, enqueues, stub_worker, monkeypatch
):
    # Given a database that fails once when the first step, just marked, confirms its operation still runs (as
    # it does without the operation's in-flight set on the marks' server)
    monkeypatch.setattr(OperationTransitions, "_alive_key", lambda self, broker, operation_id: None)
    blip = fail_once(sql_errors.OperationalError("SELECT ...", {}, Exception("database is locked")))
    monkeypatch.setattr(OperationTransitions, "_still_to_record", blip(OperationTransitions._still_to_record))

    # When a three-step sequence runs
    handle = SequenceExecutor.execute(make_instance(make_tenant(), volumes=0), behaviours=[""] * 3)
    drain(stub_broker)

    # Then the retried record took its own mark as its own, and the chain went on: each step ran once
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert enqueues.sent == ["s0"]
    assert labels() == ["s0", "s1", "s2"]


def fail_once(error: Exception) -> Any:
    def wrap(real: Any) -> Any:
        calls = [0]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise error
            return real(*args, **kwargs)

        return wrapper

    return wrap


def test_the_steps_still_to_run_are_found_through_recorded_steps() -> None:
    # A sequence of three steps and a group of two: what step 0's completion led to, given what is done
    root = {
        "kind": "seq",
        "children": [
            {"kind": "step"},
            {"kind": "step"},
            {"kind": "par", "children": [{"kind": "step"}, {"kind": "step"}]},
        ],
    }
    assert pending_after(root, {"0"}, "0") == ["1"]
    assert pending_after(root, {"0", "1"}, "0") == ["2.0", "2.1"]
    assert pending_after(root, {"0", "1", "2.0"}, "0") == ["2.1"]
    assert pending_after(root, {"0", "1", "2.0", "2.1", "2", ""}, "0") == []


def test_a_cancel_stops_the_chain_before_its_next_step(stub_broker, enqueues, stub_worker):
    # Given a sequence whose second step cancels the operation
    instance = make_instance(make_tenant(), volumes=0)

    # When it runs
    handle = SequenceExecutor.execute(instance, behaviours=["", "cancel", "", ""])
    drain(stub_broker)

    # Then no step after the cancel ran
    assert handle.wait(timeout=30).status == OperationStatus.CANCELLED
    assert labels() == ["s0", "s1"]


def test_a_step_failing_in_a_chain_fails_the_operation_with_the_steps_before_it_recorded(
    stub_broker, enqueues, stub_worker
):
    # Given a sequence whose third step fails for good
    instance = make_instance(make_tenant(), volumes=0)

    # When it runs
    handle = SequenceExecutor.execute(instance, behaviours=["", "", "fail", ""])
    drain(stub_broker)

    # Then the operation failed at that step, the two before it are recorded, and nothing after it ran
    operation = handle.wait(timeout=30)
    assert operation.status == OperationStatus.FAILED
    assert operation.error_message == "step s2 fails for good"
    assert labels() == ["s0", "s1", "s2"]
    assert {"0", "1"} <= done_paths(handle.id) and "2" not in done_paths(handle.id)


def test_a_step_retried_in_a_chain_goes_through_the_broker_and_the_operation_goes_on(
    stub_broker, enqueues, stub_worker
):
    # Given a sequence whose third step hits a database blip once
    instance = make_instance(make_tenant(), volumes=0)

    # When it runs
    handle = SequenceExecutor.execute(instance, behaviours=["", "", "blip", "", ""])
    drain(stub_broker)

    # Then its retry was sent through the broker and started a chain of its own, and each step ran once
    # but the retried one
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert set(enqueues.sent) == {"s0", "s2"}  # the retry passes through the delay queue: two enqueues
    assert labels() == ["s0", "s1", "s2", "s2", "s3", "s4"]
    assert {"0", "1", "2", "3", "4"} <= done_paths(handle.id)


@pytest.fixture
def admissions(stub_broker: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The steps the throttle was asked to admit, by label."""
    throttle = find_throttle(stub_broker)
    assert throttle is not None
    asked: list[str] = []
    real = throttle.before_step

    def before_step(broker: Any, message: Message[Any]) -> int | None:
        asked.append(message.args[0])
        return real(broker, message)

    monkeypatch.setattr(throttle, "before_step", before_step)
    return asked


def test_chained_steps_of_a_sequence_run_under_the_grant_of_the_first(stub_broker, enqueues, admissions, stub_worker):
    # Given a throttled operation of three steps in sequence
    handle = ThrottledExecutor.execute(make_instance(make_tenant(), volumes=0))

    # When it runs
    drain(stub_broker)

    # Then only its first step asked the throttle, and every step ran under that step's grant
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert admissions == ["s0"]
    assert fences["s0"] is not None and fences == {"s0": fences["s0"], "s1": fences["s0"], "s2": fences["s0"]}


def test_the_first_steps_lease_is_queued_in_the_round_trip_of_its_mark(stub_broker, enqueues, monkeypatch, stub_worker):
    # Given a throttled operation of three steps in sequence, and the Redis calls its steps' records make
    import middleware.step_marks as step_marks
    import middleware.transitions as transitions

    with_marks: list[list[str]] = []
    alone: list[list[str]] = []

    def spy(made: list[list[str]], real: Any) -> Any:
        def run_calls(client: Any, calls: Any) -> Any:
            made.append(["queued" if call.args[2] == "queued" else call.args[0] for call in calls])
            return real(client, calls)

        return run_calls

    monkeypatch.setattr(step_marks, "run_calls", spy(with_marks, step_marks.run_calls))
    monkeypatch.setattr(transitions, "run_calls", spy(alone, transitions.run_calls))
    throttle = find_throttle(stub_broker)
    assert throttle is not None
    handle = ThrottledExecutor.execute(make_instance(make_tenant(), volumes=0))

    # When it runs
    drain(stub_broker)

    # Then the first step's mark carried the throttle's lease call (its lease stops expiring once it is over:
    # "queued"), the second step's mark went alone, and no round trip was made for the lease by itself
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert with_marks == [["queued", "0"], ["1"]]
    assert alone == []


def test_chained_steps_inside_a_group_ask_the_throttle(stub_broker, enqueues, admissions, stub_worker):
    # Given a throttled operation whose two branches run side by side, each a sequence of two steps
    handle = ThrottledExecutor.execute(make_instance(make_tenant(), volumes=0), grouped=True)

    # When it runs
    drain(stub_broker)

    # Then each branch's second step was chained, and asked the throttle: a worker running the other branch
    # may be killed and the operation's lease reaped meanwhile
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert sorted(enqueues.sent) == ["a0", "b0"]
    assert sorted(admissions) == ["a0", "a1", "b0", "b1"]


def test_a_step_whose_mark_a_sibling_recorded_before_its_check_goes_on(stub_broker, enqueues, stub_worker, monkeypatch):
    # Given a group of two sequences, and a sibling step's completion that records the operation's marks in the
    # database (as complete_step does) just after each branch's first step marked itself, before its check (made
    # without the operation's in-flight set on the marks' server)
    monkeypatch.setattr(OperationTransitions, "_alive_key", lambda self, broker, operation_id: None)
    real = OperationTransitions._still_to_record
    one_sibling = threading.Lock()  # the two branches' checks may come together: one writes the records at a time

    def sibling_recorded_the_marks(self: Any, operation_id: str, path: str, *args: Any) -> Any:
        with one_sibling, session_scope() as session:
            # As every recorder of steps does, the operation's row locked first (on SQLite, the write lock taken):
            # the branch recording its own steps meanwhile cannot slip in between this read and these inserts.
            session.execute(select(Operation.id).where(Operation.id == operation_id).with_for_update())
            recorded = set(session.scalars(select(StepDone.path).where(StepDone.operation_id == operation_id)))
            for marked, at in StepMarks().paths(operation_id).items():
                if marked not in recorded:
                    session.add(StepDone(operation_id=operation_id, path=marked, done_at=at))
        return real(self, operation_id, path, *args)

    monkeypatch.setattr(OperationTransitions, "_still_to_record", sibling_recorded_the_marks)
    handle = ThrottledExecutor.execute(make_instance(make_tenant(), volumes=0), grouped=True)

    # When it runs
    drain(stub_broker)

    # Then each first step took the record of its own mark as its own, not as another copy's, and its branch went
    # on: every step ran once and the operation succeeded
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert sorted(labels()) == ["a0", "a1", "b0", "b1"]


def test_a_worker_shutting_down_sends_the_next_step_instead_of_running_it(stub_broker, enqueues, stub_worker):
    # Given a worker that has begun to shut down
    instance = make_instance(make_tenant(), volumes=0)
    transitions = next(m for m in stub_broker.middleware if isinstance(m, OperationTransitions))
    transitions.before_worker_shutdown(stub_broker, stub_worker)
    try:
        # When a sequence runs
        handle = SequenceExecutor.execute(instance, behaviours=[""] * 3)
        drain(stub_broker)
    finally:
        transitions.after_worker_boot(stub_broker, stub_worker)

    # Then no step was chained: a stop waits for the steps under way, not for whole chains
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    assert enqueues.sent == ["s0", "s1", "s2"]
