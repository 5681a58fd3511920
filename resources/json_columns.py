"""JSON columns written from text already encoded, so a value encoded once for a check is not encoded again.

``execute()`` encodes an operation's plan to check that each of its messages can travel; the row stores that
same text (``EncodedJSON``) instead of having the column's type encode the plan a second time. Anything else is
encoded as SQLAlchemy's JSON type always does, with ``json.dumps``.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["EncodedJSON", "serialize_json"]


class EncodedJSON(str):
    """JSON text to store as it is in a JSON column (the engines' ``json_serializer`` passes it through)."""


def serialize_json(value: Any) -> str:
    """The engines' ``json_serializer``: ``EncodedJSON`` as it is, anything else through ``json.dumps``."""
    if type(value) is EncodedJSON:
        return value
    return json.dumps(value)
