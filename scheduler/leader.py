"""One scheduler at a time: a leader lease in Redis (redis-py's Lock: a token-owned key with a TTL).

Every scheduler process tries to take the lease; the one that holds it renews it every third of its
TTL and sends the ticks, the others wait for it to expire. A leader that stops cleanly releases it at
once; one that dies is replaced when the lease expires, at most ``JOBS_SCHEDULER_LEASE_S`` after its
last renewal. The lease's value names the holder (host, pid), for ``python -m scheduler status``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid

import redis
from redis.exceptions import LockError
from redis.lock import Lock

__all__ = ["LeaderLease"]

logger = logging.getLogger(__name__)


class LeaderLease:
    def __init__(self, client: redis.Redis, key: str, *, ttl_s: float, identity: str | None = None) -> None:
        self.client = client
        self.key = key
        self.ttl_s = ttl_s
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = Lock(client, key, timeout=ttl_s, blocking=False, thread_local=False)
        self.held = False

    def hold(self) -> bool:
        """Renew the lease if this process holds it, else try to take it. True while this is the leader."""
        if self.held:
            try:
                self._lock.reacquire()
                return True
            except LockError:
                self.held = False
                logger.warning("scheduler %s lost the leader lease (it expired); following now", self.identity)
        if self._lock.acquire(blocking=False, token=self.identity):
            self.held = True
            logger.info("scheduler %s is the leader now", self.identity)
        return self.held

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(LockError):  # it had expired already
                self._lock.release()

    def holder(self) -> str | None:
        return self.client.get(self.key)

    def remaining_s(self) -> float:
        """How long the current holder's lease still runs (0 when nobody holds it)."""
        return max(0.0, self.client.pttl(self.key) / 1000)
