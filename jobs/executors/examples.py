"""Real executors for the example resources: instances with volumes on a cloud backend."""

from __future__ import annotations

from typing import Any

from dramatiq import group

from resources.models import Instance, Volume

from ..actors import (
    backend_method,
    heavy_backend_method,
    poll_backend_check,
    poll_runtime_state,
    state_transition,
)
from .base import Signature
from .standard import ActionExecutor, CreateExecutor, DeleteExecutor, UpdateExecutor

__all__ = [
    "InstanceCreateExecutor",
    "InstanceDeleteExecutor",
    "InstanceResizeExecutor",
    "InstanceUpdateExecutor",
    "VolumeCreateExecutor",
    "VolumeDeleteExecutor",
    "VolumeExtendExecutor",
]


#: Every example executor lets a caller tune its polls.
POLL_OPTIONS = frozenset({"interval_s", "attempts"})


def _poll_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Poll interval and attempts a caller may pass through execute(); unset means the configured ones."""
    return {k: kwargs[k] for k in ("interval_s", "attempts") if kwargs.get(k) is not None}


class VolumeCreateExecutor(CreateExecutor):
    options = POLL_OPTIONS

    @classmethod
    def get_task_signature(cls, instance: Volume, serialized_instance: str, **kwargs: Any) -> Signature:
        return [
            backend_method.message(serialized_instance, "create", state_transition="begin_creating"),
            poll_runtime_state.message(serialized_instance, "available", erred_state="error", **_poll_options(kwargs)),
        ]


class InstanceCreateExecutor(CreateExecutor):
    """begin_creating → create every volume in parallel → create the server → wait until ACTIVE."""

    options = POLL_OPTIONS

    @classmethod
    def get_task_signature(cls, instance: Instance, serialized_instance: str, **kwargs: Any) -> Signature:
        return [
            state_transition.message(serialized_instance, "begin_creating"),
            group([VolumeCreateExecutor.stage(volume, **_poll_options(kwargs)) for volume in instance.volumes]),
            backend_method.message(serialized_instance, "create"),
            poll_runtime_state.message(serialized_instance, "ACTIVE", erred_state="ERROR", **_poll_options(kwargs)),
        ]


class InstanceUpdateExecutor(UpdateExecutor):
    """Push ``updated_fields`` (e.g. a new name) to the backend."""

    options = POLL_OPTIONS

    @classmethod
    def get_task_signature(cls, instance: Instance, serialized_instance: str, **kwargs: Any) -> Signature:
        return [
            backend_method.message(
                serialized_instance,
                "update",
                state_transition="begin_updating",
                updated_fields=list(kwargs.get("updated_fields") or []),
            ),
            poll_runtime_state.message(serialized_instance, "ACTIVE", erred_state="ERROR", **_poll_options(kwargs)),
        ]


class InstanceResizeExecutor(ActionExecutor):
    """Resize to ``flavor``. The resize itself is heavy work: it runs on the heavy queue."""

    action = "resize"
    options = POLL_OPTIONS
    required_options = frozenset({"flavor"})

    @classmethod
    def pre_apply(cls, instance: Instance, **kwargs: Any) -> None:
        kwargs.setdefault("action_details", {"flavor": kwargs.get("flavor")})
        super().pre_apply(instance, **kwargs)

    @classmethod
    def get_task_signature(cls, instance: Instance, serialized_instance: str, **kwargs: Any) -> Signature:
        return [
            state_transition.message(serialized_instance, "begin_updating"),
            heavy_backend_method.message(serialized_instance, "resize", flavor=kwargs["flavor"]),
            poll_runtime_state.message(serialized_instance, "ACTIVE", erred_state="ERROR", **_poll_options(kwargs)),
        ]


class VolumeExtendExecutor(ActionExecutor):
    action = "extend"
    options = POLL_OPTIONS
    required_options = frozenset({"size_gb"})

    @classmethod
    def get_task_signature(cls, instance: Volume, serialized_instance: str, **kwargs: Any) -> Signature:
        return [
            state_transition.message(serialized_instance, "begin_updating"),
            backend_method.message(serialized_instance, "extend", size_gb=kwargs["size_gb"]),
            poll_runtime_state.message(serialized_instance, "available", erred_state="error", **_poll_options(kwargs)),
        ]


class VolumeDeleteExecutor(DeleteExecutor):
    options = POLL_OPTIONS

    @classmethod
    def get_task_signature(cls, instance: Volume, serialized_instance: str, **kwargs: Any) -> Signature:
        return [
            backend_method.message(serialized_instance, "delete", state_transition="begin_deleting"),
            poll_backend_check.message(serialized_instance, "is_gone", **_poll_options(kwargs)),
        ]


class InstanceDeleteExecutor(DeleteExecutor):
    """begin_deleting → delete the server → wait until it is gone → delete every volume in parallel."""

    options = POLL_OPTIONS

    @classmethod
    def get_task_signature(cls, instance: Instance, serialized_instance: str, **kwargs: Any) -> Signature:
        return [
            backend_method.message(serialized_instance, "delete", state_transition="begin_deleting"),
            poll_backend_check.message(serialized_instance, "is_gone", **_poll_options(kwargs)),
            group([VolumeDeleteExecutor.stage(volume, **_poll_options(kwargs)) for volume in instance.volumes]),
        ]
