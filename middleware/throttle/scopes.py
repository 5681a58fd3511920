"""Throttle scopes: a key and the most operations that may hold it at once."""

from __future__ import annotations

import re
from dataclasses import dataclass

from resources.errors import ConfigurationError
from resources.limits import validate_limit

__all__ = ["ThrottleScope"]

# Scope keys become parts of Redis key names: keep them printable and free of separators' surprises.
_KEY = re.compile(r"^[A-Za-z0-9_.:@/+=-]{1,200}$")


@dataclass(frozen=True)
class ThrottleScope:
    """At most ``limit`` operations hold ``key`` at once; an operation holds it from its first step to
    its end."""

    key: str
    limit: int

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _KEY.match(self.key):
            raise ConfigurationError(
                f"throttle scope key {self.key!r} is not valid; use 1-200 characters from letters, digits "
                "and _ . : @ / + = -"
            )
        validate_limit(self.limit, what=f"the limit of throttle scope {self.key!r}")
