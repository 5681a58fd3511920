"""The periodic jobs. Each schedule is a cron expression with an environment override."""

from __future__ import annotations

import logging
import os

import dramatiq
from periodiq import cron
from sqlalchemy import select

from jobs import queues
from resources.backends import get_backend
from resources.changes import store_changes
from resources.db import session_scope
from resources.errors import BackendNotFound, ResourceNotFound
from resources.models import resource_types
from resources.states import State
from resources.transitions import load_resource

__all__ = ["PULL_SCHEDULE", "pull_resource", "pull_resources"]

logger = logging.getLogger(__name__)

#: When every settled resource's runtime state is refreshed from its backend (Waldur: hourly).
PULL_SCHEDULE = os.environ.get("JOBS_PULL_SCHEDULE", "0 * * * *")


@dramatiq.actor(queue_name=queues.BACKGROUND, periodic=cron(PULL_SCHEDULE), max_retries=0, time_limit=300_000)
def pull_resources() -> None:
    """Fan out one pull per OK or ERRED resource."""
    refs: list[str] = []
    with session_scope() as session:
        for model in resource_types().values():
            rows = session.scalars(select(model.uuid).where(model.state.in_([State.OK, State.ERRED])))
            refs.extend(f"{model.resource_type}:{uuid}" for uuid in rows)
    for ref in refs:
        pull_resource.send(ref)
    logger.info("pull: %d resource(s) queued", len(refs))


@dramatiq.actor(queue_name=queues.BACKGROUND, max_retries=0, time_limit=60_000)
def pull_resource(ref: str) -> None:
    """Store the backend's runtime state on a settled resource (no operation owns it)."""
    try:
        with session_scope() as session:
            resource = load_resource(session, ref).snapshot()
    except ResourceNotFound:
        return
    if resource.state not in (State.OK, State.ERRED):
        return  # an operation is at work on it; its own steps keep it current
    try:
        changes = get_backend(resource).pull(resource)
    except BackendNotFound:
        logger.warning("%s does not exist at its backend", ref)
        return
    with session_scope() as session:
        store_changes(session, ref, {"runtime_state": changes.get("runtime_state", "")}, resource.operation_id)
