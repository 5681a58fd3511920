"""An operation's progress (middleware/progress.py) under random plans and hostile delivery schedules.

Hypothesis builds a plan the way executors do — steps in sequences and parallel groups, nested, some of
them nested executors with failure callbacks of their own — with the project's PlanBuilder, stores it on an
operation row, and then plays a broker and a pool of workers against the real database: any message in
the queue may be delivered next (reordering), a delivery may leave a copy behind (a duplicate), a started
step finishes in any order with the others, and may fail for good. Each delivery goes through
``check_step`` (before the step) and then ``complete_step`` or ``fail_operation`` (after it), each in a
transaction of its own, as the OperationTransitions middleware calls them; what they return is sent after
the commit. A step in the middle of a sequence may instead be marked done in Redis, as a worker that runs
its successor itself does (``step_marks``); the marks go with every call, and ``fail_operation`` is preceded
by stopping the operation's chains. A small model — which steps are done, which were sent, whether the
operation has ended — predicts every answer.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import pytest
from dramatiq import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from jobs.actors import error_state_transition, state_transition
from middleware.plan import OPTION_NODE, PlanBuilder, next_in_sequence, node_at, step_paths
from middleware.progress import (
    Progress,
    check_step,
    complete_step,
    fail_operation,
    finish_without_session,
    first_steps,
    outgoing_of,
)
from middleware.step_marks import StepMarks
from resources.db import read_scope, session_scope
from resources.models import Operation, OperationStatus, StepDone, new_uuid
from tests.fixtures import reset_database

# -- plans -------------------------------------------------------------------------------------------------

#: A plan's shape: "step", ("seq" | "par", [shapes]) or ("party", shape) — a nested executor's work.
shapes = st.recursive(
    st.just("step"),
    lambda children: st.one_of(
        st.tuples(st.sampled_from(["seq", "par"]), st.lists(children, min_size=2, max_size=3)),
        st.tuples(st.just("party"), children),
    ),
    max_leaves=8,
)


def resource_ref() -> str:
    return f"volume:{new_uuid()}"


@dataclass
class NestedStage:
    """A nested executor as a stage (as ExecutorStage builds it): a party of its own, with a failure callback."""

    ref: str
    work: Any

    def build_node(self, builder: PlanBuilder) -> dict | None:
        party = builder.add_party(self.ref, "NestedExecutor")
        builder.set_failure(party, error_state_transition.message(self.ref))
        node = builder.node_for_party(party, self.work)
        if node is not None:
            node.setdefault("parties", []).append(party)
        return node


def compose(shape: Any, counter: itertools.count) -> Any:
    """The work executors would return for ``shape``: messages, lists (sequences), groups, nested stages."""
    if shape == "step":
        return state_transition.message(f"instance:{'0' * 32}", f"step-{next(counter)}")
    kind, inner = shape
    if kind == "party":
        return NestedStage(resource_ref(), compose(inner, counter))
    children = [compose(child, counter) for child in inner]
    return dramatiq.group(children) if kind == "par" else children


def new_operation(shape: Any) -> tuple[str, dict]:
    """Build the plan with the project's PlanBuilder and store a running operation with it."""
    operation_id = new_uuid()
    root_ref = f"instance:{new_uuid()}"
    builder = PlanBuilder(operation_id)
    builder.add_party(root_ref, "RootExecutor")
    builder.set_failure(0, error_state_transition.message(root_ref))
    plan = builder.finish(builder.node(compose(shape, itertools.count())))
    with session_scope() as session:
        session.add(Operation(id=operation_id, executor="RootExecutor", resource_ref=root_ref, plan=plan))
    return operation_id, plan


def path_of(message: Message) -> str:
    return message.options[OPTION_NODE]


def leaves_under(root: dict, path: str) -> set[str]:
    return set(step_paths(node_at(root, path), path))


def predecessors(root: dict, path: str) -> set[str]:
    """The steps that must have completed before step ``path`` may be sent: in every enclosing sequence,
    all the steps of the children before the one that leads to ``path``."""
    result: set[str] = set()
    parts = path.split(".") if path else []
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        if node_at(root, parent)["kind"] != "seq":
            continue
        for earlier in range(int(parts[depth])):
            result |= leaves_under(root, f"{parent}.{earlier}" if parent else str(earlier))
    return result


# -- the run -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """The model of one operation's run, and what the real functions answered."""

    operation_id: str
    plan: dict
    steps: set[str] = field(default_factory=set)
    #: Steps whose completion was recorded while the operation was running.
    done: set[str] = field(default_factory=set)
    #: How many times each step was sent: first steps, then what completions returned.
    sent: Counter[str] = field(default_factory=Counter)
    #: "succeeded" / "failed" for every answer that said the operation ended.
    ends: list[str] = field(default_factory=list)
    #: The failure callbacks (message ids) each fail_operation call returned.
    callbacks: list[list[str]] = field(default_factory=list)
    #: The failure callbacks due when the operation failed: every party whose part had not finished.
    callbacks_due: set[str] = field(default_factory=set)

    @property
    def ended(self) -> bool:
        return bool(self.ends)

    def node_done(self, path: str) -> bool:
        return leaves_under(self.plan["root"], path) <= self.done


def send(run: Run, progress: Progress, queue: list[Message]) -> None:
    """What the middleware does after its commit: send what the step's outcome returned."""
    for item in progress.outgoing:
        path = path_of(item.message)
        # Properties: no step sent twice, none before every step it follows completed, and every step that
        # just became sendable sent now (nothing is lost).
        assert run.sent[path] == 0, f"step {path} sent a second time"
        missing = predecessors(run.plan["root"], path) - run.done
        assert not missing, f"step {path} sent before {sorted(missing)} completed"
        run.sent[path] += 1
        queue.append(item.message)
    sendable = {p for p in run.steps if not run.sent[p] and predecessors(run.plan["root"], p) <= run.done}
    assert run.ended or not sendable, f"steps {sorted(sendable)} may run but were not sent"


marks = StepMarks()


def deliver(run: Run, message: Message) -> bool:
    """The middleware's check before a step; True when the step runs."""
    path = path_of(message)
    marked = marks.paths(run.operation_id)
    with read_scope() as session:
        check = check_step(session, run.operation_id, path, marked)
    if run.ended:
        assert check.skip is not None and check.ended, f"step {path} ran after its operation ended"
    else:
        assert (check.skip is not None) == (path in run.done), f"step {path}: {check} with done={sorted(run.done)}"
        assert not check.ended
    return check.skip is None


def succeed(run: Run, message: Message, queue: list[Message], chain: bool, knows_plan: bool) -> None:
    """A step succeeded. With ``chain``, a step in the middle of a sequence is marked in Redis, as a worker
    that runs its successor next does, unless the operation's chains were stopped. With ``knows_plan``, its
    record is given the plan, as a worker's is (the last step then takes the record's shorter way)."""
    path = path_of(message)
    following = next_in_sequence(run.plan["root"], path)
    if chain and following is not None and marks.record(run.operation_id, path):
        # As OperationTransitions does after marking a delivered step: go on only if the database has
        # neither ended the operation nor recorded the step (a copy that ran beside this one).
        with read_scope() as session:
            goes_on = check_step(session, run.operation_id, path).skip is None
        if goes_on:
            assert not run.ended, f"step {path} went on after its operation ended"
            assert path not in run.done, f"step {path} completed twice and went on twice"
            run.done.add(path)
            send(run, Progress(outgoing_of(run.plan, following)), queue)
            return
        marks.unmark(run.operation_id, path)
        assert run.ended or path in run.done, f"step {path} was held back, but it was new and its operation ran"
        return
    marked = marks.paths(run.operation_id)
    # A worker knowing the plan records the last step in one statement where it can (PostgreSQL), as a worker does.
    progress = finish_without_session(run.operation_id, path, marked, run.plan) if knows_plan else None
    if progress is None:
        with session_scope() as session:
            progress = complete_step(session, run.operation_id, path, marked, plan=run.plan if knows_plan else None)
    if run.ended or path in run.done:  # a step that ran twice, or finished after the end: nothing follows
        assert progress == Progress([]), f"the second completion of {path} answered {progress}"
        return
    run.done.add(path)
    assert progress.ended == (run.done == run.steps), f"completing {path} answered ended={progress.ended}"
    if progress.ended:
        run.ends.append("succeeded")
    send(run, progress, queue)


def fail(run: Run, message: Message) -> None:
    if not run.ended:
        run.callbacks_due = {
            party["on_failure"][0]["message_id"]
            for party in run.plan["parties"]
            if party["path"] is None or not run.node_done(party["path"])
        }
    marks.stop_chains(run.operation_id)
    marked = marks.paths(run.operation_id)
    with session_scope() as session:
        progress = fail_operation(
            session, run.operation_id, message.actor_name, "boom", "Traceback: boom", marked=marked
        )
    run.callbacks.append([item.message.message_id for item in progress.outgoing])
    if run.ended:
        assert progress == Progress([]), f"a failure after the end answered {progress}"
        return
    assert progress.ended
    run.ends.append("failed")


def play(shape: Any, data: st.DataObject) -> Run:
    """One operation under a schedule hypothesis draws: which queued message is delivered next, whether a
    copy stays behind, which running step finishes next, and whether it fails for good."""
    operation_id, plan = new_operation(shape)
    run = Run(operation_id, plan, steps=set(step_paths(plan["root"])))
    queue: list[Message] = []
    send(run, Progress(first_steps(plan)), queue)
    running: list[Message] = []
    may_fail = data.draw(st.booleans(), label="steps may fail")
    duplicates = data.draw(st.integers(0, 2 * len(run.steps)), label="duplicate budget")
    while queue or running:
        if queue and (not running or data.draw(st.booleans(), label="deliver (or finish)")):
            message = queue.pop(data.draw(st.integers(0, len(queue) - 1), label="deliver"))
            if duplicates and data.draw(st.booleans(), label="duplicate"):
                duplicates -= 1
                queue.insert(data.draw(st.integers(0, len(queue)), label="duplicate at"), message)
            if deliver(run, message):
                running.append(message)
        else:
            message = running.pop(data.draw(st.integers(0, len(running) - 1), label="finish"))
            if may_fail and data.draw(st.sampled_from(["succeeds", "succeeds", "fails"]), label="outcome") == "fails":
                fail(run, message)
            else:
                chain = data.draw(st.booleans(), label="runs its successor next")
                succeed(run, message, queue, chain, data.draw(st.booleans(), label="its record knows the plan"))
    return run


@pytest.fixture(scope="module")
def schema() -> None:
    reset_database()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
@given(shape=shapes, data=st.data())
def test_progress_under_duplicates_reordering_and_failures(schema, shape, data):
    """The properties, checked as the run goes and at its end:

    - every step is sent exactly when all the steps it follows have completed: never twice (a redelivered
      group member must not start the next stage again), never early, never lost;
    - a step runs (check_step lets it through) only if the operation runs and the step has not completed;
    - the operation ends exactly once: SUCCEEDED only when every step completed, FAILED otherwise;
    - the failure callbacks come from exactly one fail_operation call, and are those of every party whose
      part had not finished — none for a nested executor that had finished;
    - after the end, every further delivery is skipped and every further outcome changes nothing.
    """
    run = play(shape, data)

    assert len(run.ends) == 1, f"the operation ended {len(run.ends)} times: {run.ends}"
    with read_scope() as session:
        status, error = session.execute(
            select(Operation.status, Operation.error_message).where(Operation.id == run.operation_id)
        ).one()
        recorded = set(session.scalars(select(StepDone.path).where(StepDone.operation_id == run.operation_id)))
    if run.ends == ["succeeded"]:
        assert status == OperationStatus.SUCCEEDED
        assert run.done == run.steps
        assert all(run.sent[p] == 1 for p in run.steps)
    else:
        assert status == OperationStatus.FAILED
        assert run.done != run.steps
        assert error == "boom"
    assert recorded & run.steps == run.done, "the database's completed steps differ from the model's"

    answered = [ids for ids in run.callbacks if ids]
    if run.ends == ["failed"]:
        assert len(answered) == 1, f"failure callbacks returned by {len(answered)} fail_operation calls"
        assert Counter(answered[0]) == Counter(run.callbacks_due), "wrong parties called back"
    else:
        assert answered == []

    # Late deliveries of every step, and late outcomes: all skipped, nothing changes.
    for path in sorted(run.steps):
        with read_scope() as session:
            check = check_step(session, run.operation_id, path, marks.paths(run.operation_id))
        assert check.skip is not None and check.ended
        assert finish_without_session(run.operation_id, path, {}, run.plan) in (None, Progress([]))
        with session_scope() as session:
            assert complete_step(session, run.operation_id, path) == Progress([])
            assert complete_step(session, run.operation_id, path, plan=run.plan) == Progress([])
            assert fail_operation(session, run.operation_id, "late", "late", "") == Progress([])
    with read_scope() as session:
        assert session.scalar(select(Operation.status).where(Operation.id == run.operation_id)) == status


def test_a_group_member_delivered_again_after_the_fan_in_sends_nothing(schema):
    """A member whose completion sent nothing (another member finished the group) is delivered again after
    the group completed: it is skipped, and the stage after the group is not started a second time."""
    operation_id, _plan = new_operation(("seq", [("par", ["step", "step"]), "step"]))
    with session_scope() as session:
        assert complete_step(session, operation_id, "0.0").outgoing == []
    with session_scope() as session:
        assert [path_of(o.message) for o in complete_step(session, operation_id, "0.1").outgoing] == ["1"]
    with read_scope() as session:
        check = check_step(session, operation_id, "0.0")
    assert check.skip is not None and not check.ended
    with session_scope() as session:  # and had both copies run, the second completion would send nothing
        assert complete_step(session, operation_id, "0.0") == Progress([])
