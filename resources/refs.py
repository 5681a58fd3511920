"""Resource references: messages carry ``type:uuid`` strings, never objects."""

from __future__ import annotations

import re

from .errors import UnknownResourceType
from .models import Resource, model_for_type

__all__ = ["parse_ref"]

_REF = re.compile(r"^(?P<type>[a-z][a-z0-9_]*):(?P<uuid>[0-9a-f]{32})$")


def parse_ref(ref: str) -> tuple[type[Resource], str]:
    """Split ``type:uuid`` into the model class and the uuid; a clear error for anything else."""
    match = _REF.match(ref) if isinstance(ref, str) else None
    if match is None:
        raise UnknownResourceType(
            f"resource reference {ref!r} is malformed; expected 'type:uuid' with a 32-digit hex uuid, "
            "as produced by Resource.ref"
        )
    return model_for_type(match["type"]), match["uuid"]
