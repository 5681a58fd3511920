"""Store what a backend reported on a resource, guarded by the operation that asked."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import inspect, select, update
from sqlalchemy.orm import Session

from .errors import ResourceNotFound
from .refs import parse_ref
from .transitions import describe

__all__ = ["store_changes"]

logger = logging.getLogger(__name__)

#: Columns a backend may never set: identity, state (only transitions move it) and bookkeeping.
_PROTECTED = frozenset({"id", "uuid", "state", "operation_id", "created_at", "service_settings_id"})


def store_changes(session: Session, ref: str, changes: dict[str, Any], operation_id: str | None) -> bool:
    """Apply ``changes`` to the resource if it still belongs to ``operation_id`` (when given).

    Returns False (and logs) when a newer operation owns the resource; raises ResourceNotFound when
    it is gone, and ValueError naming the field when a backend returns something that is no column.
    """
    if not changes:
        return True
    model, uuid = parse_ref(ref)
    columns = {c.key for c in inspect(model).column_attrs}
    unknown = sorted(set(changes) - columns | set(changes) & _PROTECTED)
    if unknown:
        raise ValueError(
            f"backend returned fields {unknown} for {model.__name__}, which a backend may not set; "
            f"return only columns of {model.__name__} other than {sorted(_PROTECTED)}"
        )
    criteria = [model.uuid == uuid]
    if operation_id is not None:
        criteria.append(model.operation_id == operation_id)
    statement = update(model).where(*criteria).values(changes).execution_options(synchronize_session="fetch")
    if session.execute(statement).rowcount == 1:
        return True
    current = session.scalar(select(model.operation_id).where(model.uuid == uuid))
    if current is None and session.scalar(select(model.id).where(model.uuid == uuid)) is None:
        raise ResourceNotFound(f"{describe(model, uuid)} no longer exists; backend result not stored")
    logger.warning(
        "%s belongs to operation %s now; result of operation %s not stored",
        describe(model, uuid),
        current,
        operation_id,
    )
    return False
