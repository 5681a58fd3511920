"""When periodic jobs are due: periodiq's ``cron(...)`` declarations, evaluated correctly.

Jobs are declared as periodiq users expect (``periodic=cron("0 * * * *")``), but periodiq's own
evaluation is not used: it never fires Sunday as ``0``, ``sun`` or ``@weekly``, computes the wake-up for
``7`` a week late, accepts out-of-range fields (``61 * * * *``) and a sixth field it then ignores. Here
the fields periodiq parsed are checked, Sunday is one day whichever way it is spelled, and the calendar
-- month lengths, leap days, daylight-saving changes in the configured zone -- is cronsim's, which
follows Debian's cron: a job whose time falls in the hour skipped in spring runs right after the
change, and one in the hour repeated in autumn runs once (jobs that run every hour or more often run
on every real hour).

``@every 30s`` (also ``m`` and ``h``) declares an interval instead, with ticks at multiples of the
interval since the Unix epoch, so that every scheduler process agrees on them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError
from periodiq import CronSpec, cron

from resources.errors import ConfigurationError

__all__ = [
    "CronSchedule",
    "Every",
    "InvalidSchedule",
    "Schedule",
    "parse_schedule",
    "schedule_for",
]

_EVERY = re.compile(r"@every\s+(\d+)\s*([smh])", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_HOW_TO = (
    "write five fields 'minute hour day-of-month month day-of-week' such as '0 * * * *' or '30 2 * * sun', "
    "an alias such as @hourly, @daily or @weekly, or an interval such as '@every 30s'"
)


class InvalidSchedule(ConfigurationError):
    """A periodic job's schedule cannot be evaluated; the message names the job and the expression."""


@dataclass(frozen=True)
class Every:
    """An interval schedule, the ``periodic`` option of an actor declared with ``@every``."""

    seconds: int

    def __str__(self) -> str:
        return f"@every {self.seconds}s"


class Schedule(Protocol):
    expression: str

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment``."""

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        """The last tick at or before ``moment``."""


@dataclass(frozen=True)
class IntervalSchedule:
    expression: str
    seconds: int

    def next_after(self, moment: datetime) -> datetime:
        ticks = math.floor(moment.timestamp() / self.seconds) + 1
        return datetime.fromtimestamp(ticks * self.seconds, UTC)

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        ticks = math.floor(moment.timestamp() / self.seconds)
        return datetime.fromtimestamp(ticks * self.seconds, UTC)


@dataclass(frozen=True)
class CronSchedule:
    expression: str
    #: The same fields in the plain numeric form cronsim reads (lists, ``*`` for a whole range).
    canonical: str
    zone: ZoneInfo

    # Ticks go in and out in UTC: arithmetic on two times of one zone ignores the hour repeated in autumn.
    def next_after(self, moment: datetime) -> datetime:
        return _utc(next(CronSim(self.canonical, self._local(moment))))

    def latest_at_or_before(self, moment: datetime) -> datetime | None:
        # cronsim walks back from strictly before its start; ticks fall on whole minutes, so starting
        # one second past the whole second includes a tick at ``moment`` itself and nothing later.
        start = self._local(moment.replace(microsecond=0) + timedelta(seconds=1))
        try:
            return _utc(next(CronSim(self.canonical, start, reverse=True)))
        except StopIteration:
            return None

    def _local(self, moment: datetime) -> datetime:
        # The same instant on this zone's clock, with the fold that tells the two passes of a repeated
        # hour apart set explicitly (conversions through freezegun's clock drop it).
        local = moment.astimezone(self.zone)
        for fold in (0, 1):
            candidate = local.replace(fold=fold)
            if candidate.timestamp() == moment.timestamp():
                return candidate
        return local


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def parse_schedule(expression: str, *, job: str) -> CronSpec | Every:
    """What goes into an actor's ``periodic`` option: periodiq's ``cron(expression)``, or an interval.
    Refuses anything periodiq would misread, naming the job and the expression."""
    text = expression.strip()
    every = _EVERY.fullmatch(text)
    if every:
        seconds = int(every.group(1)) * _UNIT_S[every.group(2).lower()]
        if seconds < 1:
            raise InvalidSchedule(f"periodic job {job!r}: schedule {expression!r} has no interval; use at least 1s")
        return Every(seconds)
    if text.lower().startswith("@every"):
        raise InvalidSchedule(f"periodic job {job!r}: schedule {expression!r} is not an interval; {_HOW_TO}")
    if text.startswith("@") and text.lower() not in CronSpec._named_spec:
        aliases = ", ".join(sorted(CronSpec._named_spec))
        raise InvalidSchedule(f"periodic job {job!r}: schedule {expression!r} is no alias; use one of {aliases}")
    fields = CronSpec._named_spec.get(text.lower(), text).split()
    if len(fields) != 5:
        raise InvalidSchedule(
            f"periodic job {job!r}: schedule {expression!r} has {len(fields)} fields, not 5; {_HOW_TO}"
        )
    try:
        spec = cron(" ".join(fields))
    except (ValueError, KeyError, IndexError) as error:
        problem = f"periodic job {job!r}: schedule {expression!r} is not valid ({error})"
        raise InvalidSchedule(f"{problem}; {_HOW_TO}") from None
    spec.parsed_from = expression
    _canonical(spec, job)  # refuse out-of-range fields now, not when the scheduler first reads them
    return spec


def schedule_for(job: str, periodic: object, zone: ZoneInfo) -> Schedule:
    """The evaluator of an actor's ``periodic`` option, checked: it must fire at least once."""
    if isinstance(periodic, Every):
        return IntervalSchedule(str(periodic), periodic.seconds)
    if not isinstance(periodic, CronSpec):
        raise InvalidSchedule(
            f"periodic job {job!r}: its periodic option is {periodic!r}; declare it with periodiq's cron(...)"
        )
    expression = str(periodic)
    schedule = CronSchedule(expression, _canonical(periodic, job), zone)
    try:
        schedule.next_after(datetime.now(UTC))
    except (StopIteration, CronSimError):
        raise InvalidSchedule(
            f"periodic job {job!r}: schedule {expression!r} never fires (no such date in the next 50 years); "
            "check the day of month against the months"
        ) from None
    return schedule


def _canonical(spec: CronSpec, job: str) -> str:
    parts = []
    for (name, low, high), chosen in zip(
        _FIELDS, (spec.minute, spec.hour, spec.dom, spec.month, spec.dow), strict=True
    ):
        if not chosen:
            raise InvalidSchedule(f"periodic job {job!r}: schedule {str(spec)!r} selects no {name}; {_HOW_TO}")
        wrong = [v for v in chosen if not low <= v <= high]
        if wrong:
            raise InvalidSchedule(
                f"periodic job {job!r}: schedule {str(spec)!r} has {name} {wrong[0]}, outside {low}-{high}"
            )
        if name == "day of week":  # Sunday is 0 and 7; cronsim, like cron, reads either
            chosen, high = sorted({day % 7 for day in chosen}), 6
        whole = set(range(low, high + 1))
        parts.append("*" if set(chosen) >= whole else ",".join(str(v) for v in chosen))
    return " ".join(parts)
