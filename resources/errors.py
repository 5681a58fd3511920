"""The project's exception hierarchy, rooted in one base error."""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendNotFound",
    "ConfigurationError",
    "InvalidArgument",
    "JobsError",
    "ResourceNotFound",
    "TransitionNotAllowed",
    "UnknownResourceType",
]


class JobsError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigurationError(JobsError):
    """A setting or an argument has a value that cannot work; the message says which and the fix."""


class InvalidArgument(ConfigurationError):
    """An executor was given an option or argument it cannot take (unknown, not JSON, too large);
    raised before anything is written or sent."""


class UnknownResourceType(JobsError):
    """A resource reference names a type that no model registers."""


class ResourceNotFound(JobsError):
    """The resource a step refers to no longer exists (it was deleted meanwhile)."""


class TransitionNotAllowed(JobsError):
    """A state transition was asked of a resource whose state does not allow it."""


class BackendError(JobsError):
    """The cloud backend refused or failed an operation."""


class BackendNotFound(BackendError):
    """The backend has no object for this resource (never created, or already gone)."""
