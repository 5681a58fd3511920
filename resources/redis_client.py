"""One Redis client (connection pool) per process and URL, shared by the parts that keep state in Redis."""

from __future__ import annotations

import functools

import redis

from .config import get_settings

__all__ = ["get_redis"]


@functools.cache
def _client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def get_redis(url: str | None = None) -> redis.Redis:
    return _client_for(url or get_settings().broker_url)
