"""Concurrency limits: positive integers, checked where they are configured."""

from __future__ import annotations

from .errors import ConfigurationError

__all__ = ["PROVISION_LIMIT_OPTION", "validate_limit"]

#: Service settings option holding the provisioning limit of one resource type, e.g.
#: ``max_concurrent_provision_instance`` (Waldur's name).
PROVISION_LIMIT_OPTION = "max_concurrent_provision_{resource_type}"


def validate_limit(value: object, *, what: str) -> int:
    """``value`` as a limit, or a ConfigurationError naming ``what``, the value and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} is {value!r}; a concurrency limit must be a positive integer (for example 4)")
    return value
