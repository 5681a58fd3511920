"""Marks that a completed step's followers were sent.

A step's completion is committed to the database before its followers are sent to the broker. A worker
that dies in between leaves the step's message unacknowledged, so the broker delivers it again; without
this mark that second delivery could not tell "followers lost" (send them) from an ordinary duplicate
(do not: they may be running). One short-lived Redis key per completed step.
"""

from __future__ import annotations

import redis

from resources.config import get_settings

from .redis_state import LazyRedis

__all__ = ["SentMarks"]

#: How long a mark is kept; a duplicate delivery later than this re-sends followers (seconds).
MARK_TTL_S = 7 * 24 * 3600


class SentMarks(LazyRedis):
    def __init__(self, client: redis.Redis | None = None, prefix: str | None = None) -> None:
        self._client = client
        self._prefix = prefix

    def _key(self, operation_id: str, path: str) -> str:
        prefix = self._prefix or f"{get_settings().namespace}:sent"
        return f"{prefix}:{operation_id}:{path}"

    def mark(self, operation_id: str, path: str) -> None:
        self.client.set(self._key(operation_id, path), 1, ex=MARK_TTL_S)

    def is_marked(self, operation_id: str, path: str) -> bool:
        return bool(self.client.exists(self._key(operation_id, path)))
