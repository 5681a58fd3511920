"""The janitor: rescue resources left in a transitional state by an operation that is no longer alive.

Waldur rescues only CREATION_SCHEDULED and CREATING, after 3 hours counted from the row's last save.
Here every transitional state has a timeout (``JOBS_STUCK_<STATE>_S``), counted from when the resource's
operation started, and a resource is touched only when nothing of its operation is left: no message
queued, delayed, running or retrying (``InFlight``), none waiting in the outbox, and no place in the
throttle's line or hand-off. A rescued resource goes to ERRED with a message naming the state and how
long it was stuck; its operation ends as failed, so its failure callbacks run once and its throttle slot is freed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import dramatiq
from sqlalchemy import func, select

from jobs.redis_broker import JobsRedisBroker
from middleware import Copy, InFlight, StepMarks, fail_operation, find_inflight, find_throttle, forget_marks
from middleware.outbox import deliver, stage
from resources.config import get_settings
from resources.db import read_scope, session_scope
from resources.metrics import janitor_rescued
from resources.models import Operation, OutboxMessage, resource_types, utcnow
from resources.states import TRANSITIONAL_STATES, State
from resources.transitions import apply_if_unchanged

from .background import periodic_job

__all__ = ["Stuck", "find_stuck", "is_alive", "janitor", "rescue"]

logger = logging.getLogger(__name__)

#: Throttle states in which an operation waits for a slot or has just been handed one.
_PARKED = frozenset({"waiting", "granted"})


@dataclass(frozen=True)
class Stuck:
    ref: str
    state: State
    operation_id: str | None
    since: datetime

    def message(self, now: datetime) -> str:
        whose = f"its operation {self.operation_id}" if self.operation_id else "no operation"
        return (
            f"Stuck in {self.state} for {_duration(now - self.since)}: {whose} has no message queued, "
            "running or parked; moved to ERRED by the janitor."
        )


def _duration(elapsed: timedelta) -> str:
    minutes = int(elapsed.total_seconds() // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def find_stuck(now: datetime, timeouts: dict[State, float]) -> list[Stuck]:
    """Resources past their state's timeout, counted from their operation's start (or, with no
    operation, from the row's last save). Whether the operation is alive is checked separately."""
    stuck: list[Stuck] = []
    with session_scope() as session:
        for model in resource_types().values():
            started = func.coalesce(Operation.created_at, model.modified_at)
            for state in sorted(TRANSITIONAL_STATES):
                query = (
                    select(model.uuid, model.operation_id, started)
                    .outerjoin(Operation, Operation.id == model.operation_id)
                    .where(model.state == state, started < now - timedelta(seconds=timeouts[state]))
                )
                for uuid, operation_id, since in session.execute(query):
                    stuck.append(Stuck(f"{model.resource_type}:{uuid}", state, operation_id, since))
    return stuck


def is_alive(broker: dramatiq.Broker, operation_id: str | None) -> bool:
    """Whether anything of the operation is left: a message anywhere (the outbox included), or a place
    with the throttle."""
    if operation_id is None:
        return False
    with read_scope() as session:
        if session.scalar(select(OutboxMessage.id).where(OutboxMessage.operation_id == operation_id).limit(1)):
            return True
        if session.scalar(select(Operation.first_steps_since).where(Operation.id == operation_id)) is not None:
            return True  # its first steps are not known sent: the relay sends them
    inflight = find_inflight(broker)
    if inflight is not None and _has_a_copy(broker, inflight, operation_id):
        return True
    throttle = find_throttle(broker)
    return throttle is not None and throttle.enabled and throttle.store.state_of(operation_id) in _PARKED


def _has_a_copy(broker: dramatiq.Broker, inflight: InFlight, operation_id: str) -> bool:
    """Does the broker hold a message of the operation? Its in-flight set names every copy, but a name is
    added before the send: a sender killed in between leaves the name of a copy that never was, which would
    keep a stuck resource "alive" until the set expires (8 days). The Redis broker can say where each copy
    is; other brokers cannot be asked cheaply, and their names are taken as they are."""
    names = inflight.copies(operation_id)
    if not names or not isinstance(broker, JobsRedisBroker):
        return bool(names)
    for copy in map(Copy.parse, names):
        if copy.broker_id is None or broker.stores(copy.queue_name, copy.broker_id):
            return True
    # None of them is there now. A copy that moves on (a retry, a delay ending, a step's successors) has its
    # successor named before it is acknowledged: the names read again then differ.
    return inflight.copies(operation_id) != names


def rescue(broker: dramatiq.Broker, stuck: Stuck, now: datetime) -> bool:
    """Move one stuck resource to ERRED and end its operation, if it is still as it was found."""
    message = stuck.message(now)
    # Nothing of the operation is in flight, so none of its chains runs: its marked steps are all there are.
    marks = StepMarks()
    marked = marks.paths(stuck.operation_id) if stuck.operation_id is not None else {}
    with session_scope() as session:
        values = {"error_message": message, "error_traceback": ""}
        if not apply_if_unchanged(
            session, stuck.ref, "set_erred", seen_state=stuck.state, seen_operation_id=stuck.operation_id, values=values
        ):
            return False  # it moved on since it was found
        outbox_id = None
        if stuck.operation_id is not None:
            progress = fail_operation(session, stuck.operation_id, "janitor", message, "", marked=marked)
            outbox_id = stage(session, stuck.operation_id, progress.outgoing, release_throttle=True)
    deliver(broker, outbox_id, stuck.operation_id or "-")
    if stuck.operation_id is not None:
        forget_marks(broker, stuck.operation_id, marks)
    logger.warning("%s: %s", stuck.ref, message)
    janitor_rescued(stuck.state)
    return True


def sweep(broker: dramatiq.Broker, now: datetime | None = None) -> list[Stuck]:
    """One janitor pass; returns the resources it moved to ERRED."""
    now = now or utcnow()
    rescued = []
    for stuck in find_stuck(now, get_settings().stuck_after_s):
        if is_alive(broker, stuck.operation_id):
            logger.info(
                "%s has been %s since %s, but its operation is still alive", stuck.ref, stuck.state, stuck.since
            )
        elif rescue(broker, stuck, now):
            rescued.append(stuck)
    return rescued


@periodic_job("*/10 * * * *", env="JOBS_JANITOR_SCHEDULE", max_retries=0, time_limit=600_000)
def janitor() -> None:
    """Move resources stuck in any of the six transitional states to ERRED."""
    rescued = sweep(dramatiq.get_broker())
    logger.info("janitor: %d stuck resource(s) moved to ERRED", len(rescued))
