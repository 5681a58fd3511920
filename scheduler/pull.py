"""The pull: keep every settled resource's record in step with its backend.

Waldur's hourly pull, fanned out one de-duplicated job per resource, so that a slow backend delays only
its own resources and a backlog never holds two pulls of one resource. A pull only acts on what it saw:
if an operation starts on the resource meanwhile, the pull's result is dropped.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from resources.backends import get_backend
from resources.changes import store_changes
from resources.db import session_scope
from resources.errors import BackendNotFound, ResourceNotFound
from resources.models import resource_types
from resources.states import State
from resources.transitions import apply_if_unchanged, load_resource

from .background import background_job, periodic_job

__all__ = ["GONE_MESSAGE", "pull_resource", "pull_resources"]

logger = logging.getLogger(__name__)

#: The error stored on a resource whose backend object has disappeared (Waldur's wording).
GONE_MESSAGE = "Does not exist at backend."


@periodic_job("0 * * * *", env="JOBS_PULL_SCHEDULE", max_retries=0, time_limit=300_000)
def pull_resources() -> None:
    """Queue one pull per OK or ERRED resource that has a backend object."""
    refs: list[str] = []
    with session_scope() as session:
        for model in resource_types().values():
            settled = select(model.uuid).where(model.state.in_([State.OK, State.ERRED]), model.backend_id != "")
            refs.extend(f"{model.resource_type}:{uuid}" for uuid in session.scalars(settled))
    queued = sum(1 for ref in refs if pull_resource.send(ref) is not None)
    logger.info("pull: %d resource(s) queued, %d already queued or running", queued, len(refs) - queued)


@background_job(max_retries=3, min_backoff=5_000, time_limit=60_000)
def pull_resource(ref: str) -> None:
    """Store the backend's view of a settled resource; recover it from ERRED when the backend reports it
    healthy; mark it ERRED when the backend has no object for it any more."""
    try:
        with session_scope() as session:
            resource = load_resource(session, ref).snapshot()
    except ResourceNotFound:
        return
    if resource.state not in (State.OK, State.ERRED) or not resource.backend_id:
        return  # an operation is at work on it (its own steps keep it current), or it was never created
    backend = get_backend(resource)
    seen = {"seen_state": resource.state, "seen_operation_id": resource.operation_id}
    try:
        changes = backend.pull(resource)
    except BackendNotFound:
        with session_scope() as session:
            values = {"error_message": GONE_MESSAGE, "error_traceback": ""}
            if resource.error_message != GONE_MESSAGE and apply_if_unchanged(
                session, ref, "set_erred", values=values, **seen
            ):
                logger.warning("%s does not exist at its backend; marked ERRED", ref)
        return
    with session_scope() as session:
        if resource.state == State.ERRED and backend.is_healthy(changes):
            if apply_if_unchanged(session, ref, "recover", values=changes, **seen):
                logger.info("%s is healthy at its backend again; recovered from ERRED", ref)
        else:
            store_changes(session, ref, changes, resource.operation_id)
