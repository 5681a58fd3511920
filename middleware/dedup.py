"""De-duplication of background jobs: an equal job is neither enqueued nor run while one is queued or
running (Waldur's BackgroundTask, without its race and its blindness to the backlog).

Two messages are equal when they are for the same actor and the same key: the actor's ``dedup`` option,
``True`` for "the arguments" or a function of the arguments returning the key. One Redis key per
(actor, key) holds the id of the message that owns it:

- sending takes it, for ``JOBS_DEDUP_QUEUED_TTL_S`` (the job may wait in a backlog that long), or
  refuses with :class:`DuplicateJob` when another message owns it;
- a worker starting the message turns it into a lease of ``JOBS_DEDUP_LEASE_S``, renewed by a heartbeat
  thread while the job runs, so the guard of a job whose worker was killed expires; a message finding
  the key owned by another is skipped;
- it is released when the job finishes or fails for good, and kept (queued again) while it retries.

Every skip is logged and counted per actor (:meth:`Deduplicate.skipped`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

import dramatiq
import redis
from dramatiq import Message
from dramatiq.middleware import Middleware, MiddlewareError, SkipMessage

from resources.config import Settings, get_settings
from resources.metrics import dedup_skipped
from resources.redis_client import get_redis

from .heartbeat import Heartbeat

__all__ = ["Deduplicate", "DuplicateJob", "find_deduplicate"]

logger = logging.getLogger(__name__)

# Take the guard for a message, or return the id of the message that owns it.
# KEYS[1] guard; ARGV: message id, ttl ms.
_TAKE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return owner end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# Extend or drop the guard only if this message owns it. KEYS[1] guard; ARGV: message id, ttl ms or 0.
_KEEP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) else redis.call('DEL', KEYS[1]) end
return 1
"""


class DuplicateJob(MiddlewareError):
    """Raised by ``send`` when an equal job is already queued or running; nothing was enqueued."""

    def __init__(self, actor_name: str, key: str, owner: str) -> None:
        super().__init__(
            f"{actor_name} not enqueued: an equal job (message {owner}, key {key}) is queued or running; "
            "it is sent again by its next tick, or once that job has finished"
        )
        self.actor_name = actor_name
        self.owner = owner


class Deduplicate(Middleware):
    actor_options = {"dedup"}

    def __init__(self, settings: Settings | None = None, *, client: redis.Redis | None = None) -> None:
        self._settings = settings
        self._client = client
        self._lock = threading.Lock()
        #: Guards of the jobs running in this process: key -> message id; the heartbeat renews them.
        self._running: dict[str, str] = {}
        self._heartbeat: Heartbeat | None = None
        self._scripts: dict[str, Any] = {}

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = get_settings()
        return self._settings

    @property
    def client(self) -> redis.Redis:
        if self._client is None:  # lazily: the CLI may start an embedded Redis after import
            self._client = get_redis(self.settings.broker_url)
        return self._client

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    @property
    def prefix(self) -> str:
        return f"{self.settings.namespace}:dedup"

    def _ms(self, seconds: float) -> int:
        return max(1, int(seconds * 1000))

    # -- which messages are equal ----------------------------------------------------------------
    def key_of(self, broker: dramatiq.Broker, message: Message[Any]) -> str | None:
        """The guard's Redis key for this message, or None when its actor does not de-duplicate."""
        try:
            spec = broker.get_actor(message.actor_name).options.get("dedup")
        except dramatiq.errors.ActorNotFound:
            return None
        if not spec:
            return None
        if callable(spec):
            identity = str(spec(*message.args, **message.kwargs))
        else:
            identity = json.dumps([message.args, message.kwargs], sort_keys=True, default=str)
        digest = hashlib.sha1(identity.encode(), usedforsecurity=False).hexdigest()[:20]
        return f"{self.prefix}:{message.actor_name}:{digest}"

    def _skip(self, message: Message[Any], where: str, owner: str) -> None:
        logger.info(
            "%s %s skipped: an equal job (message %s) is queued or running",
            message.actor_name,
            where,
            owner,
        )
        self.client.hincrby(f"{self.prefix}:skipped", f"{message.actor_name}:{where}", 1)
        dedup_skipped(message.actor_name, where)

    # -- producer side ---------------------------------------------------------------------------
    def before_enqueue(self, broker: dramatiq.Broker, message: Message[Any], delay: int | None) -> None:
        key = self.key_of(broker, message)
        if key is None:
            return
        owner = self._script(_TAKE)(keys=[key], args=[message.message_id, self._ms(self.settings.dedup_queued_ttl_s)])
        if owner:
            self._skip(message, "enqueue", owner)
            raise DuplicateJob(message.actor_name, key, owner)

    def give_back(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        """Release the guard taken for a message whose enqueue then failed (it never reached the queue)."""
        key = self.key_of(broker, message)
        if key is not None:
            self._keep(key, message.message_id, 0)

    # -- worker side -----------------------------------------------------------------------------
    def before_process_message(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        key = self.key_of(broker, message)
        if key is None:
            return
        owner = self._script(_TAKE)(keys=[key], args=[message.message_id, self._ms(self.settings.dedup_lease_s)])
        if owner:
            self._skip(message, "run", owner)
            raise SkipMessage(f"an equal job (message {owner}) is queued or running")
        with self._lock:
            self._running[key] = message.message_id

    def after_process_message(
        self, broker: dramatiq.Broker, message: Message[Any], *, result: Any = None, exception: Any = None
    ) -> None:
        key = self._stop_running(broker, message)
        if key is None:
            return
        if exception is None or message.failed:
            self._keep(key, message.message_id, 0)
        else:  # Retries has queued it again: it owns the guard while it waits
            self._keep(key, message.message_id, self._ms(self.settings.dedup_queued_ttl_s))

    def after_skip_message(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        key = self._stop_running(broker, message)
        if key is not None:
            self._keep(key, message.message_id, 0)  # a no-op when an equal job owns it

    def _stop_running(self, broker: dramatiq.Broker, message: Message[Any]) -> str | None:
        key = self.key_of(broker, message)
        if key is not None:
            with self._lock:
                self._running.pop(key, None)
        return key

    def _keep(self, key: str, message_id: str, ttl_ms: int) -> bool:
        return bool(self._script(_KEEP)(keys=[key], args=[message_id, ttl_ms]))

    # -- the heartbeat ---------------------------------------------------------------------------
    def renew(self) -> None:
        with self._lock:
            running = list(self._running.items())
        lease_ms = self._ms(self.settings.dedup_lease_s)
        for key, message_id in running:
            if not self._keep(key, message_id, lease_ms):
                logger.warning("the guard of running message %s (%s) expired or was taken", message_id, key)

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        self._heartbeat = Heartbeat("dedup-heartbeat", self.settings.dedup_lease_s / 3, self.renew)
        self._heartbeat.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    # -- looking inside --------------------------------------------------------------------------
    def owner(self, broker: dramatiq.Broker, message: Message[Any]) -> str | None:
        """The message that owns the guard of jobs equal to ``message``, if any."""
        key = self.key_of(broker, message)
        return None if key is None else self.client.get(key)

    def skipped(self) -> dict[str, int]:
        """Skips so far, per ``<actor>:enqueue`` and ``<actor>:run``."""
        return {field: int(count) for field, count in self.client.hgetall(f"{self.prefix}:skipped").items()}


def find_deduplicate(broker: dramatiq.Broker) -> Deduplicate | None:
    return next((m for m in broker.middleware if isinstance(m, Deduplicate)), None)
