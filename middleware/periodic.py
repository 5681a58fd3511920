"""Periodic messages: each tick of a schedule runs once, however late, and may retry.

periodiq's own middleware drops a periodic message older than 30 s as stale, which drops every retry (a
retry keeps its first ``scheduled_at``) and every tick that waited in a backlog. Here nothing is dropped
for its age -- the de-duplication guard already keeps ticks from piling up, and an actor that wants an
age limit has Dramatiq's ``max_age``. What is dropped is a second message for a tick that already ran:
the scheduler re-sends a tick whose send it cannot prove (a leader that died between sending and
recording it), so the first message of a tick to start claims it, for itself and its retries.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
import redis
from dramatiq import Message
from dramatiq.middleware import Middleware, SkipMessage

from resources.config import get_settings

from .redis_state import LazyRedis

__all__ = ["OPTION_TICK", "PeriodicTicks"]

logger = logging.getLogger(__name__)

#: Message option: the tick (Unix time, seconds) of the schedule this message was sent for.
OPTION_TICK = "tick"
#: How long a claimed tick is remembered; a duplicate of a tick older than this would run again.
CLAIM_TTL_S = 8 * 24 * 3600


class PeriodicTicks(LazyRedis, Middleware):
    #: The actor option periodiq's ``cron(...)`` goes in, declared here instead of by periodiq's middleware.
    actor_options = {"periodic"}

    def __init__(self, client: redis.Redis | None = None) -> None:
        self._client = client

    def before_process_message(self, broker: dramatiq.Broker, message: Message[Any]) -> None:
        tick = message.options.get(OPTION_TICK)
        if tick is None:
            return  # sent by hand, not by the scheduler
        key = f"{get_settings().namespace}:periodic:ran:{message.actor_name}:{tick}"
        if self.client.set(key, message.message_id, nx=True, ex=CLAIM_TTL_S):
            return
        owner = self.client.get(key)
        if owner == message.message_id:
            return  # a retry, or a redelivery of the same message
        logger.info("%s tick %s already ran as message %s; duplicate skipped", message.actor_name, tick, owner)
        self.client.hincrby(f"{get_settings().namespace}:periodic:duplicates", message.actor_name, 1)
        raise SkipMessage(f"tick {tick} already ran as message {owner}")
