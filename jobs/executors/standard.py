"""The four kinds of operation, with Waldur's state handling. Subclass one and give it the work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from middleware import ThrottleScope
from resources.changes import store_changes
from resources.models import Resource
from resources.states import State
from resources.transitions import apply_transition, claim_for_operation

from ..actors import delete_resource, error_state_transition, state_transition
from .base import BaseExecutor, Signature
from .throttling import provisioning_scope

__all__ = ["ActionExecutor", "CreateExecutor", "DeleteExecutor", "UpdateExecutor"]


class _OkOrErredExecutor(BaseExecutor):
    """Success: set_ok. Failure: set_erred (the error is already stored on the resource)."""

    @classmethod
    def get_success_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return state_transition.message(serialized_instance, "set_ok")

    @classmethod
    def get_failure_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return error_state_transition.message(serialized_instance)


class CreateExecutor(_OkOrErredExecutor):
    """New rows start in CREATION_SCHEDULED; the work should begin with ``begin_creating``.

    Throttled per resource type and service settings (see ``provisioning_scope``); override
    ``throttle_scopes`` to throttle differently, or return () not to.
    """

    @classmethod
    def throttle_scopes(cls, instance: Resource, **kwargs: Any) -> Sequence[ThrottleScope]:
        return [provisioning_scope(instance)]

    @classmethod
    def pre_apply(cls, instance: Resource, *, session: Session, operation_id: str, **kwargs: Any) -> None:
        claim_for_operation(session, instance.ref, operation_id, expected=State.CREATION_SCHEDULED)


class UpdateExecutor(_OkOrErredExecutor):
    """Gets ``updated_fields``; the work should begin with ``begin_updating``."""

    options = frozenset({"updated_fields"})

    @classmethod
    def pre_apply(cls, instance: Resource, *, session: Session, operation_id: str, **kwargs: Any) -> None:
        apply_transition(session, instance.ref, "schedule_updating", operation_id=operation_id)


class ActionExecutor(BaseExecutor):
    """Gets ``action`` and ``action_details``, shown on the resource while the action runs."""

    options = frozenset({"action", "action_details"})

    #: The label stored in ``Resource.action`` when the caller does not pass one.
    action: str = ""

    @classmethod
    def pre_apply(cls, instance: Resource, *, session: Session, operation_id: str, **kwargs: Any) -> None:
        values = {
            "action": kwargs.get("action") or cls.action or cls.executor_name(),
            "action_details": kwargs.get("action_details") or {},
        }
        if instance.state == State.UPDATE_SCHEDULED and instance.operation_id is None:
            # Scheduled by the caller already (Waldur skips the transition then): just claim it.
            claim_for_operation(session, instance.ref, operation_id, expected=State.UPDATE_SCHEDULED)
            store_changes(session, instance.ref, values, operation_id)
            return
        apply_transition(session, instance.ref, "schedule_updating", operation_id=operation_id, values=values)

    @classmethod
    def get_success_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return state_transition.message(serialized_instance, "set_ok", clear_action=True)

    @classmethod
    def get_failure_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return error_state_transition.message(serialized_instance, clear_action=True)


class DeleteExecutor(BaseExecutor):
    """On success the row is deleted. ``force=True`` deletes the row even when the work fails."""

    options = frozenset({"force"})

    @classmethod
    def pre_apply(cls, instance: Resource, *, session: Session, operation_id: str, **kwargs: Any) -> None:
        apply_transition(session, instance.ref, "schedule_deleting", operation_id=operation_id)

    @classmethod
    def get_success_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return delete_resource.message(serialized_instance)

    @classmethod
    def get_failure_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        if kwargs.get("force"):
            return delete_resource.message(serialized_instance)
        return error_state_transition.message(serialized_instance)
