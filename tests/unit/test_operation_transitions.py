"""What follows a completed step is sent after its commit, before its message is acknowledged; a worker
stopped in between leaves the message to be delivered again, and that delivery sends what was missing —
once: what was sent already is not sent twice."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from dramatiq import Message
from dramatiq.middleware import CurrentMessage, SkipMessage

from jobs.executors import InstanceCreateExecutor
from middleware import OperationTransitions, StepMarks, find_inflight, find_throttle
from middleware.outbox import relay
from middleware.plan import OPTION_NODE
from middleware.progress import complete_step
from resources.backends import SimulatedConfig
from resources.db import session_scope
from resources.models import OperationStatus
from tests.fixtures import drain, make_instance, make_tenant
from tests.unit.test_outbox import outbox_rows


def transitions_of(broker: Any) -> OperationTransitions:
    return next(m for m in broker.middleware if isinstance(m, OperationTransitions))


def take_queued(broker: Any) -> list[Message[Any]]:
    """Every message waiting in the stub broker's queues, removed from them."""
    taken = []
    for queue in broker.queues.values():
        while not queue.empty():
            taken.append(Message.decode(queue.get_nowait()))
            queue.task_done()
    return taken


def test_a_worker_stopped_between_its_commit_and_its_send_has_the_step_delivered_again_and_loses_nothing(
    stub_broker, unchained, stub_worker, cloud, monkeypatch
):
    # Given a worker that stops right after committing its first step, before sending what follows
    instance = make_instance(make_tenant(), volumes=0)
    real_send = OperationTransitions._send
    unsent: list[Message[Any]] = []

    def stop_once(self: OperationTransitions, broker: Any, operation_id: str, progress: Any) -> None:
        if not unsent:
            unsent.append(CurrentMessage.get_current_message())
            return
        real_send(self, broker, operation_id, progress)

    monkeypatch.setattr(OperationTransitions, "_send", stop_once)
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    assert handle.status() == OperationStatus.RUNNING  # stalled after its first step

    # When the broker delivers that step again, as it does with a message its worker never acknowledged
    stub_broker.enqueue(unsent[0])
    drain(stub_broker)

    # Then the duplicate is skipped, what followed it is sent, and the operation runs to its end
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED


def test_a_completed_step_delivered_again_sends_only_what_is_neither_completed_nor_sent(stub_broker, cloud):
    # Given an operation whose first step has been recorded (no worker: the test plays it), by a worker
    # killed after InFlight noted the next message and before the broker had it
    instance = make_instance(make_tenant(), volumes=0)
    handle = InstanceCreateExecutor.execute(instance)
    [first] = take_queued(stub_broker)
    with session_scope() as session:
        progress = complete_step(session, handle.id, first.options[OPTION_NODE])
    assert progress.outgoing
    inflight = find_inflight(stub_broker)
    assert inflight is not None
    for item in progress.outgoing:
        inflight.before_enqueue(stub_broker, item.message, None)
    transitions = transitions_of(stub_broker)

    # When the step is delivered again
    with pytest.raises(SkipMessage):
        transitions.before_process_message(stub_broker, first)

    # Then what follows is sent
    resent = take_queued(stub_broker)
    assert [m.message_id for m in resent] == [item.message.message_id for item in progress.outgoing]

    # When it is delivered again after a worker sent what follows (it is in the broker, not yet run)
    transitions._send(stub_broker, handle.id, progress)
    with pytest.raises(SkipMessage):
        transitions.before_process_message(stub_broker, first)

    # Then nothing more is sent
    assert len(take_queued(stub_broker)) == len(progress.outgoing)


def test_a_step_of_a_succeeded_operation_delivered_again_frees_the_slot_a_stopped_worker_kept(
    stub_broker, stub_worker, cloud, monkeypatch
):
    # Given a worker that stops after committing an operation's success, before releasing its throttle slot
    instance = make_instance(make_tenant(), volumes=0)
    throttle = find_throttle(stub_broker)
    assert throttle is not None
    real_end = OperationTransitions._end
    last: list[Message[Any]] = []

    def stop_once(self: OperationTransitions, broker: Any, operation_id: str) -> None:
        if not last:
            last.append(CurrentMessage.get_current_message())
            return
        real_end(self, broker, operation_id)

    monkeypatch.setattr(OperationTransitions, "_end", stop_once)
    handle = InstanceCreateExecutor.execute(instance)
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED
    drain(stub_broker)
    assert throttle.store.state_of(handle.id) == "holding"  # still holds its slot

    # When its last step is delivered again
    stub_broker.enqueue(last[0])
    drain(stub_broker)

    # Then the slot is free
    assert throttle.store.state_of(handle.id) == "done"


def test_what_follows_a_step_waits_in_the_outbox_while_the_broker_refuses_it(
    stub_broker, unchained, stub_worker, cloud, monkeypatch
):
    # Given a broker that refuses every message after an operation's first step has been taken
    instance = make_instance(make_tenant(), volumes=0)
    handle = InstanceCreateExecutor.execute(instance)
    real_enqueue = stub_broker.enqueue
    refused: list[str] = []

    def refuse(message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        refused.append(message.message_id)
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(stub_broker, "enqueue", refuse)
    drain(stub_broker)
    assert refused and handle.status() == OperationStatus.RUNNING
    assert outbox_rows() == 1  # what follows the first step, kept for the relay

    # When the broker answers again and the relay runs
    monkeypatch.setattr(stub_broker, "enqueue", real_enqueue)
    assert relay(stub_broker, older_than_s=0) == 1
    drain(stub_broker)

    # Then the operation runs to its end
    assert handle.wait(timeout=30).status == OperationStatus.SUCCEEDED


@pytest.mark.parametrize("fails", [False, True])
def test_an_ended_operation_leaves_no_sent_marks_behind(stub_broker, stub_worker, cloud, fails):
    # Given an operation that runs to its end, well or not, sending some steps (its volumes' group) and chaining
    # others
    instance = make_instance(make_tenant(), volumes=2)
    if fails:
        cloud.configure(SimulatedConfig(build_ms=40, delete_ms=20, failures={"instance.create": 1.0}))
    inflight = find_inflight(stub_broker)
    assert inflight is not None

    # When it has ended
    handle = InstanceCreateExecutor.execute(instance)
    ended = handle.wait(timeout=30)
    drain(stub_broker)

    # Then the marks of its sent and chained steps are gone (they would otherwise stay for days, per operation)
    assert ended.status == (OperationStatus.FAILED if fails else OperationStatus.SUCCEEDED)
    assert inflight.sent(handle.id) == set()
    assert StepMarks().paths(handle.id) == {}
