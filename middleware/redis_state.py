"""The Redis client of a middleware that keeps state in Redis, opened on first use.

Lazily, because the CLI may start an embedded Redis (and set REDIS_URL) after the broker is built.
"""

from __future__ import annotations

import redis

from resources.redis_client import get_redis

__all__ = ["LazyRedis"]


class LazyRedis:
    _client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = get_redis()
        return self._client
