"""The interface between actors and a cloud: one backend class per resource type.

A backend method takes a detached snapshot of the resource (no database session is open while the
cloud is called, which may take minutes) and returns the fields to store on the resource. Actors own
the database; backends own the conversation with the cloud.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from ..errors import ConfigurationError
from ..models import Instance, Resource, Volume

__all__ = [
    "Changes",
    "InstanceBackend",
    "ResourceBackend",
    "VolumeBackend",
    "get_backend",
    "register_backend",
]

#: Fields to store on the resource after a backend call, e.g. {"backend_id": "i-42", "runtime_state": "BUILD"}.
Changes = dict[str, Any]
R = TypeVar("R", bound=Resource)


class ResourceBackend(ABC, Generic[R]):
    """Operations every resource type supports. Every mutating method must be idempotent: the broker
    delivers at least once, so a create of a resource that already exists returns the existing object."""

    #: Runtime states of a working object: a periodic pull that finds one recovers an ERRED resource.
    healthy_runtime_states: ClassVar[frozenset[str]] = frozenset()

    def is_healthy(self, changes: Changes) -> bool:
        """Whether a pull's result shows a working object."""
        return changes.get("runtime_state") in self.healthy_runtime_states

    @abstractmethod
    def create(self, resource: R) -> Changes: ...

    @abstractmethod
    def pull(self, resource: R) -> Changes:
        """Read the backend's view (at least ``runtime_state``); BackendNotFound if it has none."""

    @abstractmethod
    def update(self, resource: R, updated_fields: list[str]) -> Changes: ...

    @abstractmethod
    def delete(self, resource: R) -> Changes:
        """Start deleting; deleting what does not exist is a success."""

    @abstractmethod
    def is_gone(self, resource: R) -> bool:
        """True once the backend has no object for the resource."""


class InstanceBackend(ResourceBackend[Instance]):
    @abstractmethod
    def resize(self, resource: Instance, flavor: str) -> Changes: ...


class VolumeBackend(ResourceBackend[Volume]):
    @abstractmethod
    def extend(self, resource: Volume, size_gb: int) -> Changes: ...


BackendFactory = Callable[[], ResourceBackend[Any]]
_FACTORIES: dict[tuple[str, str], BackendFactory] = {}


def register_backend(backend_name: str, resource_type: str, factory: BackendFactory) -> None:
    """Make ``factory()`` the backend for resources of ``resource_type`` in settings using ``backend_name``."""
    _FACTORIES[(backend_name, resource_type)] = factory


def get_backend(resource: Resource) -> ResourceBackend[Any]:
    backend_name = resource.service_settings.backend
    try:
        factory = _FACTORIES[(backend_name, resource.resource_type)]
    except KeyError:
        known = ", ".join(f"{b}/{t}" for b, t in sorted(_FACTORIES)) or "none"
        raise ConfigurationError(
            f"no backend {backend_name!r} for resource type {resource.resource_type!r} "
            f"(service settings {resource.service_settings.name!r}); registered: {known}. "
            "Register one with resources.backends.register_backend"
        ) from None
    return factory()
