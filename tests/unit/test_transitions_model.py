"""The state machine's compare-and-set transitions against a pure-Python model of Waldur's, driven by hypothesis.

The model below is Waldur's state machine written out by hand (the eight states, the named transitions and
their sources), plus the operation guard this project adds: a transition carrying an operation id acts
only on a resource that still belongs to that operation. A rule-based state machine sends random sequences
of calls to the real functions of ``resources.transitions`` on a real database row — new operations,
their own steps, the same call delivered twice, late deliveries of superseded operations, illegal moves,
errors recorded by a failing operation, periodic jobs acting on what they saw earlier — predicts each
call's answer with the model, and after every call compares the row with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from resources.db import session_scope
from resources.errors import TransitionNotAllowed
from resources.models import Instance, new_uuid
from resources.states import TRANSITIONS, State
from resources.transitions import apply_if_unchanged, apply_transition, claim_for_operation, record_error
from tests.fixtures import make_tenant

S = State

# -- the model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelTransition:
    sources: frozenset[State]
    target: State
    starts_operation: bool = False


#: Waldur's StateMixin transitions, written out independently of resources/states.py.
MODEL: dict[str, ModelTransition] = {
    "begin_creating": ModelTransition(frozenset({S.CREATION_SCHEDULED}), S.CREATING),
    "schedule_updating": ModelTransition(frozenset({S.OK, S.ERRED}), S.UPDATE_SCHEDULED, True),
    "begin_updating": ModelTransition(frozenset({S.UPDATE_SCHEDULED}), S.UPDATING),
    "schedule_deleting": ModelTransition(frozenset({S.OK, S.ERRED}), S.DELETION_SCHEDULED, True),
    "begin_deleting": ModelTransition(frozenset({S.DELETION_SCHEDULED}), S.DELETING),
    "set_ok": ModelTransition(frozenset(State), S.OK),
    "set_erred": ModelTransition(frozenset(State), S.ERRED),
    "recover": ModelTransition(frozenset({S.ERRED}), S.OK),
}
SCHEDULES = sorted(name for name, t in MODEL.items() if t.starts_operation)
STEPS = sorted(name for name, t in MODEL.items() if not t.starts_operation)
BEGINS = frozenset(name for name in STEPS if name.startswith("begin_"))
ERRORS = [("", ""), ("boom", "Traceback: boom"), ("quota exceeded", "Traceback: quota")]

#: What a call may answer: True (the row changed), False (a harmless no-op) or REFUSED (TransitionNotAllowed).
REFUSED = "refused"
Outcome = bool | str


@dataclass(frozen=True)
class Row:
    state: State
    operation_id: str | None
    error_message: str = ""
    error_traceback: str = ""


def moved(row: Row, target: State, **changes: Any) -> Row:
    """``row`` moved to ``target``: leaving ERRED clears the error, any other move keeps it."""
    if row.state == S.ERRED and target != S.ERRED:
        row = replace(row, error_message="", error_traceback="")
    return replace(row, state=target, **changes)


def expect_transition(row: Row, name: str, operation_id: str | None) -> tuple[Outcome, Row]:
    """What ``apply_transition(name, operation_id=...)`` must answer, and the row after it."""
    t = MODEL[name]
    allowed = row.state in t.sources
    if t.starts_operation:
        if allowed:
            return True, moved(row, t.target, operation_id=operation_id)
        if row.operation_id == operation_id and row.state == t.target:
            return False, row  # the same operation scheduled twice
        return REFUSED, row
    if operation_id is None:  # no guard: plain Waldur
        return (True, moved(row, t.target)) if allowed else (REFUSED, row)
    if row.operation_id != operation_id:
        return False, row  # late: the resource belongs to another operation now
    if allowed:
        return True, moved(row, t.target)
    if row.state == t.target:
        return False, row  # a duplicate of this operation's own transition
    return REFUSED, row


def expect_if_unchanged(row: Row, name: str, seen: tuple[State, str | None], values: dict) -> tuple[Outcome, Row]:
    t = MODEL[name]
    seen_state = seen[0]
    if seen_state not in t.sources:
        return REFUSED, row
    if (row.state, row.operation_id) != seen:
        return False, row  # it moved on since the periodic job looked
    return True, replace(moved(row, t.target), **values)


def expect_claim(row: Row, operation_id: str, expected: State) -> tuple[Outcome, Row]:
    if row.state == expected and row.operation_id is None:
        return True, replace(row, operation_id=operation_id)
    return REFUSED, row


def expect_record_error(row: Row, operation_id: str, error: tuple[str, str]) -> tuple[Outcome, Row]:
    if row.operation_id != operation_id:
        return False, row
    return True, replace(row, error_message=error[0], error_traceback=error[1])


def test_the_model_is_the_state_table_of_the_code():
    """Protects against the code's table drifting from Waldur's (or the model from the code) unnoticed."""
    assert set(MODEL) == set(TRANSITIONS)
    for name, t in MODEL.items():
        code = TRANSITIONS[name]
        assert (code.sources, code.target, code.starts_operation) == (t.sources, t.target, t.starts_operation), name


# -- the machine -------------------------------------------------------------------------------------------


def attempt(call: Any) -> Outcome:
    """Run ``call(session)`` in a transaction of its own, as a step does; REFUSED if it was not allowed."""
    try:
        with session_scope() as session:
            result = call(session)
    except TransitionNotAllowed:
        return REFUSED
    return True if result is None else result


class TransitionsMachine(RuleBasedStateMachine):
    """One resource row, driven by random calls; the model predicts every answer and the row after it."""

    tenant_id: int = 0  # set by the test before it runs

    def __init__(self) -> None:
        super().__init__()
        self.row = Row(S.CREATION_SCHEDULED, None)
        self.ref = ""
        self.row_id = 0
        #: Operations that owned the row and were replaced by a newer one: their deliveries come late.
        self.superseded: list[str] = []
        #: The last call, to deliver it again: (label, call, model prediction, is it a guarded begin_*, answer).
        self.last: tuple[str, Any, Any, bool, Outcome] | None = None
        #: What a periodic job saw when it looked at the row: (state, operation id).
        self.seen: tuple[State, str | None] | None = None

    # -- helpers -------------------------------------------------------------------------------------------
    def run(self, label: str, call: Any, predict: Any, *, guarded_begin: bool = False) -> Outcome:
        """Run ``call``, check its answer against ``predict(row)`` and move the model on."""
        expected, after = predict(self.row)
        outcome = attempt(call)
        assert outcome == expected, f"{label} on {self.row}: got {outcome!r}, the model says {expected!r}"
        if after.operation_id != self.row.operation_id and self.row.operation_id is not None:
            self.superseded.append(self.row.operation_id)
        self.row = after
        self.last = (label, call, predict, guarded_begin, outcome)
        return outcome

    def transition(self, name: str, operation_id: str | None) -> Outcome:
        return self.run(
            f"{name}(operation={operation_id})",
            lambda s: apply_transition(s, self.ref, name, operation_id=operation_id),
            lambda row: expect_transition(row, name, operation_id),
            guarded_begin=name in BEGINS and operation_id is not None,
        )

    # -- rules ---------------------------------------------------------------------------------------------
    @initialize(state=st.sampled_from(State), error=st.sampled_from(ERRORS))
    def new_resource(self, state: State, error: tuple[str, str]) -> None:
        """A row as a service leaves it: any state (set directly, as Waldur allows), no operation yet."""
        with session_scope() as session:
            instance = Instance(
                name="vm",
                service_settings_id=self.tenant_id,
                state=state,
                error_message=error[0],
                error_traceback=error[1],
            )
            session.add(instance)
        self.ref, self.row_id = instance.ref, instance.id
        self.row = Row(state, None, *error)

    @rule(name=st.sampled_from(SCHEDULES))
    def schedule_new_operation(self, name: str) -> None:
        """pre_apply of an update, action or delete: a new operation id, stamped if the state allows it."""
        self.transition(name, new_uuid())

    @rule(expected=st.sampled_from([S.CREATION_SCHEDULED, S.UPDATE_SCHEDULED]))
    def claim_new_operation(self, expected: State) -> None:
        """pre_apply of a create (or of an action the caller scheduled): claim a free row for a new operation."""
        operation_id = new_uuid()
        self.run(
            f"claim_for_operation({expected})",
            lambda s: claim_for_operation(s, self.ref, operation_id, expected=expected),
            lambda row: expect_claim(row, operation_id, expected),
        )

    @precondition(lambda self: self.row.operation_id is not None)
    @rule(name=st.sampled_from(STEPS))
    def own_step(self, name: str) -> None:
        """A step or callback of the operation that owns the row: begin_*, set_ok, set_erred, recover."""
        self.transition(name, self.row.operation_id)

    @rule(name=st.sampled_from(STEPS))
    def unguarded(self, name: str) -> None:
        """A transition outside any operation (no operation id): only the state table decides."""
        self.transition(name, None)

    @precondition(lambda self: self.row.operation_id is not None)
    @rule(error=st.sampled_from(ERRORS[1:]))
    def operation_fails(self, error: tuple[str, str]) -> None:
        """fail_operation stores the error on the resource of the operation that failed."""
        operation_id = self.row.operation_id
        assert operation_id is not None
        self.run(
            "record_error",
            lambda s: record_error(s, self.ref, operation_id, *error),
            lambda row: expect_record_error(row, operation_id, error),
        )

    @precondition(lambda self: self.last is not None)
    @rule()
    def duplicate(self) -> None:
        """The last call delivered again (a lost acknowledgement): it must change nothing the first did not.

        Protects the idempotency requirement: the same operation's begin_* twice is a no-op, and a
        callback delivered twice acts once."""
        assert self.last is not None
        label, call, predict, guarded_begin, first = self.last
        first_call_row = self.row
        outcome = self.run(label, call, predict, guarded_begin=guarded_begin)
        assert self.row == first_call_row, f"the duplicate {label} changed the row"
        if guarded_begin and first is True:
            assert outcome is False, f"a duplicate {label} must be a quiet no-op, not {outcome!r}"

    @precondition(lambda self: bool(self.superseded))
    @rule(name=st.sampled_from([*STEPS, "record_error"]), data=st.data())
    def late_delivery(self, name: str, data: st.DataObject) -> None:
        """A step, callback or error of an older, superseded operation, delivered after a newer one took
        over: protects against a late callback undoing the newer operation's state or error."""
        old = data.draw(st.sampled_from(self.superseded), label="superseded operation")
        before = self.row
        if name == "record_error":
            outcome = self.run(
                "late record_error",
                lambda s: record_error(s, self.ref, old, "late", "late"),
                lambda row: expect_record_error(row, old, ("late", "late")),
            )
        else:
            outcome = self.transition(name, old)
        assert outcome is False, f"late {name} of a superseded operation answered {outcome!r}"
        assert self.row == before

    @rule(data=st.data())
    def illegal(self, data: st.DataObject) -> None:
        """A transition the state table forbids: TransitionNotAllowed, and the row stays as it was."""
        candidates = [(name, self.row.operation_id) for name in STEPS if self.row.operation_id is not None]
        candidates += [(name, None) for name in STEPS] + [(name, new_uuid()) for name in SCHEDULES]
        refused = [c for c in candidates if expect_transition(self.row, *c)[0] == REFUSED]
        if not refused:
            return  # from this state every transition is allowed or a no-op
        name, operation_id = data.draw(st.sampled_from(refused), label="illegal transition")
        before = self.row
        assert self.transition(name, operation_id) == REFUSED
        assert self.row == before

    @rule()
    def periodic_job_looks(self) -> None:
        """pull or the janitor reads the row; it acts on what it saw, maybe much later."""
        self.seen = (self.row.state, self.row.operation_id)

    @precondition(lambda self: self.seen is not None)
    @rule(name=st.sampled_from(["set_erred", "recover"]))
    def periodic_job_acts(self, name: str) -> None:
        """The janitor's set_erred or pull's recover, only if the row is still as the job saw it."""
        seen = self.seen
        assert seen is not None
        values = {"error_message": "Stuck", "error_traceback": ""} if name == "set_erred" else {}
        self.seen = None
        self.run(
            f"{name} if unchanged since {seen}",
            lambda s: apply_if_unchanged(
                s, self.ref, name, seen_state=seen[0], seen_operation_id=seen[1], values=values
            ),
            lambda row: expect_if_unchanged(row, name, seen, values),
        )

    # -- invariant -----------------------------------------------------------------------------------------
    @invariant()
    def row_matches_model(self) -> None:
        if not self.ref:
            return
        with session_scope() as session:
            stored = session.execute(
                select(Instance.state, Instance.operation_id, Instance.error_message, Instance.error_traceback).where(
                    Instance.id == self.row_id
                )
            ).one()
        assert Row(*stored) == self.row


def test_transitions_against_the_model(database):
    """Random sequences of transitions, duplicates, late and illegal deliveries agree with the model."""
    TransitionsMachine.tenant_id = make_tenant().id
    run_state_machine_as_test(
        TransitionsMachine,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None, print_blob=True),
    )


@pytest.mark.parametrize("name", sorted(BEGINS))
def test_the_same_begin_twice_is_a_no_op(database, name):
    """The idempotency requirement in its plainest form, for each begin_*."""
    scheduled = {"begin_creating": S.CREATION_SCHEDULED, "begin_updating": S.UPDATE_SCHEDULED}
    source = scheduled.get(name, S.DELETION_SCHEDULED)
    operation_id = new_uuid()
    with session_scope() as session:
        instance = Instance(name="vm", service_settings_id=make_tenant().id, state=source, operation_id=operation_id)
        session.add(instance)
    assert attempt(lambda s: apply_transition(s, instance.ref, name, operation_id=operation_id)) is True
    assert attempt(lambda s: apply_transition(s, instance.ref, name, operation_id=operation_id)) is False
    with session_scope() as session:
        assert session.get_one(Instance, instance.id).state == MODEL[name].target
