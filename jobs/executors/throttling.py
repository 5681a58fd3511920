"""The default throttle scope of provisioning: one per resource type and service settings (tenant)."""

from __future__ import annotations

from middleware import ThrottleScope
from resources.config import get_settings
from resources.limits import PROVISION_LIMIT_OPTION, validate_limit
from resources.models import Resource

__all__ = ["provisioning_scope"]


def provisioning_scope(instance: Resource) -> ThrottleScope:
    """At most ``max_concurrent_provision_<type>`` (a service settings option, else the configured
    default) creations of this resource type at once in the instance's service settings."""
    settings = instance.service_settings
    option = PROVISION_LIMIT_OPTION.format(resource_type=instance.resource_type)
    configured = (settings.options or {}).get(option)
    if configured is None:
        limit = get_settings().throttle_default_limit
    else:
        limit = validate_limit(configured, what=f"option {option} of service settings {settings.name!r}")
    return ThrottleScope(f"provision:{instance.resource_type}:{settings.uuid}", limit)
