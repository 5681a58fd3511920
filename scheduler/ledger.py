"""What the scheduler has done, kept in Redis so that a new leader carries on where the last stopped.

Per job, the last tick handled (sent, or skipped because an equal job was still queued or running): a
new leader sends only ticks after it. A job seen for the first time gets the present moment instead,
so it first fires at its next tick, not at start-up. A history stream records every tick handled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

__all__ = ["HistoryEntry", "TickLedger"]

#: Entries the history stream keeps (approximately).
HISTORY_LENGTH = 10_000

# Record a handled tick: the last tick only moves forward; one history entry per call.
# KEYS[1] last ticks hash, KEYS[2] history stream; ARGV: job, tick, outcome, detail, scheduler.
_RECORD = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) <= last then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
  'job', ARGV[1], 'tick', ARGV[2], 'outcome', ARGV[3], 'detail', ARGV[4], 'scheduler', ARGV[5])
return 1
"""


@dataclass(frozen=True)
class HistoryEntry:
    job: str
    tick: float
    outcome: str
    detail: str
    scheduler: str


class TickLedger:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.last_key = f"{prefix}:last"
        self.history_key = f"{prefix}:history"
        self._record = client.register_script(_RECORD)

    def last(self, job: str) -> float | None:
        value = self.client.hget(self.last_key, job)
        return None if value is None else float(value)

    def start_from(self, job: str, moment: float) -> float:
        """The last tick of ``job``, or -- for a job never seen -- ``moment``, stored as if handled."""
        self.client.hsetnx(self.last_key, job, repr(moment))
        return float(self.client.hget(self.last_key, job))

    def record(self, job: str, tick: float, outcome: str, detail: str, scheduler: str) -> bool:
        """Note a handled tick; False if a later one was recorded already (another leader was faster)."""
        args: list[Any] = [job, repr(tick), outcome, detail, scheduler, HISTORY_LENGTH]
        return bool(self._record(keys=[self.last_key, self.history_key], args=args))

    def history(self, count: int = 100) -> list[HistoryEntry]:
        """The most recent entries, oldest first."""
        entries = self.client.xrevrange(self.history_key, count=count)
        return [
            HistoryEntry(f["job"], float(f["tick"]), f["outcome"], f["detail"], f["scheduler"])
            for _id, f in reversed(entries)
        ]
