"""State transitions as atomic compare-and-set updates.

Each transition is one ``UPDATE … WHERE state IN (sources) [AND operation_id = …]``: two writers cannot
both win, and a late or duplicate callback of an older operation matches no row and changes nothing.
Only when no row matched do we read the row back, to tell the caller why.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from .errors import ResourceNotFound, TransitionNotAllowed
from .metrics import transition_applied
from .models import Resource
from .refs import parse_ref
from .states import State, Transition, get_transition

__all__ = [
    "apply_if_unchanged",
    "apply_transition",
    "claim_for_operation",
    "describe",
    "load_resource",
    "record_error",
]

logger = logging.getLogger(__name__)


def describe(model: type[Resource], uuid: str) -> str:
    return f"{model.__name__} {uuid[:8]}…"


def load_resource(session: Session, ref: str, *, for_update: bool = False) -> Resource:
    """The resource a ``type:uuid`` reference points to, or ResourceNotFound."""
    model, uuid = parse_ref(ref)
    query = select(model).where(model.uuid == uuid)
    if for_update:
        query = query.with_for_update(of=model)
    resource = session.scalars(query).one_or_none()
    if resource is None:
        raise ResourceNotFound(f"{describe(model, uuid)} ({ref}) no longer exists; it was deleted meanwhile")
    return resource


def apply_transition(
    session: Session,
    ref: str,
    transition_name: str,
    *,
    operation_id: str | None = None,
    values: dict[str, Any] | None = None,
) -> bool:
    """Apply a named transition to the resource ``ref``, in the session's transaction.

    ``operation_id``: for a transition that starts an operation (``schedule_*``) it is stamped on the
    resource; for any other it must match the resource's current operation, or nothing changes.
    Returns True if the row changed, False for a harmless no-op (a duplicate delivery of the same
    operation's transition, or a late callback of an older operation — logged).
    Raises TransitionNotAllowed or ResourceNotFound.
    """
    transition = get_transition(transition_name)
    model, uuid = parse_ref(ref)
    new_values = _new_values(model, transition, values)
    criteria = [model.uuid == uuid, model.state.in_(transition.sources)]
    if transition.starts_operation:
        if operation_id is None:
            raise ValueError(f"{transition.name} starts an operation: pass the new operation_id")
        new_values["operation_id"] = operation_id
    elif operation_id is not None:
        criteria.append(model.operation_id == operation_id)

    statement = update(model).where(*criteria).values(new_values)
    result = session.execute(statement.execution_options(synchronize_session="fetch"))
    if result.rowcount == 1:
        logger.debug("%s: %s -> %s", ref, transition.name, transition.target)
        transition_applied(session, model.resource_type, transition.name)
        return True
    return _explain_no_match(session, model, uuid, transition, operation_id)


def apply_if_unchanged(
    session: Session,
    ref: str,
    transition_name: str,
    *,
    seen_state: State,
    seen_operation_id: str | None,
    values: dict[str, Any] | None = None,
) -> bool:
    """Apply a transition only if the resource is still as a periodic job saw it: in ``seen_state`` and
    owned by ``seen_operation_id`` (None: by no operation). False, quietly, when it moved on meanwhile
    (an operation started, a user deleted it): what the job saw no longer holds."""
    transition = get_transition(transition_name)
    if seen_state not in transition.sources:
        raise TransitionNotAllowed(
            f"{ref} was seen {seen_state}; {transition.name} needs {transition.describe_sources()}"
        )
    model, uuid = parse_ref(ref)
    owner = model.operation_id.is_(None) if seen_operation_id is None else model.operation_id == seen_operation_id
    statement = (
        update(model)
        .where(model.uuid == uuid, model.state == seen_state, owner)
        .values(_new_values(model, transition, values))
        .execution_options(synchronize_session="fetch")
    )
    if session.execute(statement).rowcount != 1:
        return False
    transition_applied(session, model.resource_type, transition.name)
    return True


def _new_values(model: type[Resource], transition: Transition, values: dict[str, Any] | None) -> dict[str, Any]:
    new_values: dict[str, Any] = {"state": transition.target, **(values or {})}
    if transition.target != State.ERRED:
        # Leaving ERRED clears the error; any other move keeps it.
        new_values["error_message"] = case((model.state == State.ERRED, ""), else_=model.error_message)
        new_values["error_traceback"] = case((model.state == State.ERRED, ""), else_=model.error_traceback)
    return new_values


def _explain_no_match(
    session: Session, model: type[Resource], uuid: str, transition: Transition, operation_id: str | None
) -> bool:
    row = session.execute(select(model.state, model.operation_id).where(model.uuid == uuid)).one_or_none()
    name = describe(model, uuid)
    if row is None:
        raise ResourceNotFound(f"{name} no longer exists; {transition.name} has nothing to act on")
    state, current_operation = row
    if operation_id is not None and current_operation == operation_id and state == transition.target:
        logger.info(
            "%s is already %s for operation %s; duplicate %s ignored", name, state, operation_id, transition.name
        )
        return False
    if operation_id is not None and not transition.starts_operation and current_operation != operation_id:
        logger.warning(
            "%s belongs to operation %s now; late %s of operation %s ignored (state stays %s)",
            name,
            current_operation,
            transition.name,
            operation_id,
            state,
        )
        return False
    raise TransitionNotAllowed(f"{name} is {state}; {transition.name} needs {transition.describe_sources()}")


def claim_for_operation(session: Session, ref: str, operation_id: str, *, expected: State) -> None:
    """Stamp a new operation on a resource that must be in ``expected`` state and free.

    Used where an operation starts without a state change (a create starts in CREATION_SCHEDULED).
    """
    model, uuid = parse_ref(ref)
    statement = (
        update(model)
        .where(model.uuid == uuid, model.state == expected, model.operation_id.is_(None))
        .values(operation_id=operation_id)
        .execution_options(synchronize_session="fetch")
    )
    if session.execute(statement).rowcount == 1:
        return
    row = session.execute(select(model.state, model.operation_id).where(model.uuid == uuid)).one_or_none()
    name = describe(model, uuid)
    if row is None:
        raise ResourceNotFound(f"{name} does not exist (was it added to the session and flushed?)")
    state, current = row
    if state != expected:
        raise TransitionNotAllowed(f"{name} is {state}; this operation needs {expected}")
    raise TransitionNotAllowed(
        f"{name} already belongs to operation {current}; an operation that starts in {expected} runs once"
    )


def record_error(session: Session, ref: str, operation_id: str, message: str, traceback: str) -> bool:
    """Store an operation's error on a resource that still belongs to that operation."""
    model, uuid = parse_ref(ref)
    statement = (
        update(model)
        .where(model.uuid == uuid, model.operation_id == operation_id)
        .values(error_message=message, error_traceback=traceback)
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount == 1
