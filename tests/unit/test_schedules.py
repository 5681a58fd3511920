"""Calendars of periodic jobs: Sunday in every spelling, month ends, leap days, DST, bad expressions."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from freezegun import freeze_time

from scheduler.schedules import Every, InvalidSchedule, parse_schedule, schedule_for

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def schedule(expression: str, zone: ZoneInfo = UTC_ZONE):
    return schedule_for("job", parse_schedule(expression, job="job"), zone)


def upcoming(
    expression: str, count: int = 3, zone: ZoneInfo = UTC_ZONE, start: datetime | None = None
) -> list[datetime]:
    """The next ``count`` ticks after ``start``, by default the (frozen) present."""
    evaluator = schedule(expression, zone)
    ticks, moment = [], start or datetime.now(UTC)
    for _ in range(count):
        moment = evaluator.next_after(moment)
        ticks.append(moment)
    return ticks


@pytest.mark.parametrize("spelling", ["0 0 * * 0", "0 0 * * 7", "0 0 * * sun", "0 0 * * SUN", "@weekly"])
@freeze_time("2026-11-18 15:00:00")  # a Wednesday
def test_every_spelling_of_sunday_fires_on_sunday(spelling):
    # When the next ticks of a weekly-on-Sunday schedule are computed
    ticks = upcoming(spelling)

    # Then they are the coming Sundays at midnight, a week apart (periodiq never fires 0/sun/@weekly,
    # and schedules 7 a week late)
    assert ticks == [
        datetime(2026, 11, 22, tzinfo=UTC),
        datetime(2026, 11, 29, tzinfo=UTC),
        datetime(2026, 12, 6, tzinfo=UTC),
    ]
    assert all(tick.isoweekday() == 7 for tick in ticks)


@freeze_time("2026-11-22 00:00:00")  # Sunday midnight exactly
def test_a_sunday_tick_due_now_is_the_latest_and_the_next_is_a_week_on():
    # Given the present moment is a Sunday tick
    weekly = schedule("0 0 * * 7")
    now = datetime.now(UTC)

    # Then it is the latest tick at or before now, and the next one is a week later
    assert weekly.latest_at_or_before(now) == now
    assert weekly.next_after(now) == datetime(2026, 11, 29, tzinfo=UTC)


@freeze_time("2027-01-30 12:00:00")
def test_day_31_skips_the_months_that_have_no_31st():
    assert upcoming("0 0 31 * *", 3) == [
        datetime(2027, 1, 31, tzinfo=UTC),
        datetime(2027, 3, 31, tzinfo=UTC),
        datetime(2027, 5, 31, tzinfo=UTC),
    ]


@freeze_time("2026-02-27 12:00:00")
def test_the_last_days_of_february_and_leap_day():
    # Day 28 fires every February; day 29 only in leap years
    assert upcoming("0 6 28 2 *", 2) == [datetime(2026, 2, 28, 6, tzinfo=UTC), datetime(2027, 2, 28, 6, tzinfo=UTC)]
    assert upcoming("0 6 29 2 *", 2) == [datetime(2028, 2, 29, 6, tzinfo=UTC), datetime(2032, 2, 29, 6, tzinfo=UTC)]


@freeze_time("2027-12-31 23:58:30")
def test_the_year_end_rolls_over():
    assert upcoming("0 0 1 1 *", 1) == [datetime(2028, 1, 1, tzinfo=UTC)]
    assert upcoming("* * * * *", 2) == [datetime(2027, 12, 31, 23, 59, tzinfo=UTC), datetime(2028, 1, 1, tzinfo=UTC)]


@freeze_time("2027-03-27 12:00:00")  # Berlin springs forward on 2027-03-28, 02:00 -> 03:00
def test_a_time_skipped_by_spring_forward_runs_right_after_the_change():
    # A daily 02:30 job: that day has no 02:30, so it runs at 03:00 (Debian cron), then 02:30 again
    ticks = upcoming("30 2 * * *", 3, BERLIN)
    local = [tick.astimezone(BERLIN).strftime("%m-%d %H:%M %Z") for tick in ticks]
    assert local == ["03-28 03:00 CEST", "03-29 02:30 CEST", "03-30 02:30 CEST"]
    # An hourly job simply has one hour fewer that day
    hourly = [t.astimezone(BERLIN).strftime("%H:%M") for t in upcoming("30 * * * *", 16, BERLIN)]
    assert "02:30" not in hourly
    assert hourly[hourly.index("01:30") + 1] == "03:30"


def test_a_time_repeated_by_fall_back_runs_once_and_hourly_jobs_run_every_real_hour():
    # Not frozen: freezegun's datetimes lose ``fold``, the flag that tells the two 02:30s apart.
    start = datetime(2027, 10, 30, 12, tzinfo=UTC)  # Berlin falls back on 2027-10-31, 03:00 -> 02:00
    daily = upcoming("30 2 * * *", 2, BERLIN, start)
    assert [t.astimezone(BERLIN).strftime("%m-%d %H:%M %Z") for t in daily] == ["10-31 02:30 CEST", "11-01 02:30 CET"]
    hourly = upcoming("30 * * * *", 16, BERLIN, start)
    repeated = [t for t in hourly if t.astimezone(BERLIN).strftime("%H:%M") == "02:30"]
    assert len(repeated) == 2 and repeated[1] - repeated[0] == (hourly[1] - hourly[0])  # one real hour apart


@freeze_time("2026-11-21 10:00:00")
def test_the_zone_decides_the_hour():
    assert upcoming("0 9 * * *", 1, BERLIN) == [datetime(2026, 11, 22, 8, tzinfo=UTC)]  # 09:00 CET
    assert upcoming("0 9 * * *", 1, UTC_ZONE) == [datetime(2026, 11, 22, 9, tzinfo=UTC)]


@freeze_time("2026-11-21 10:00:01")
def test_interval_ticks_are_multiples_of_the_interval_since_the_epoch():
    assert parse_schedule("@every 30s", job="job") == Every(30)
    ticks = upcoming("@every 30s", 2)
    assert ticks == [datetime(2026, 11, 21, 10, 0, 30, tzinfo=UTC), datetime(2026, 11, 21, 10, 1, tzinfo=UTC)]
    assert schedule("@every 2m").latest_at_or_before(datetime.now(UTC)) == datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "complaint"),
    [
        ("61 * * * *", "minute 61, outside 0-59"),
        ("0 24 * * *", "hour 24, outside 0-23"),
        ("0 0 32 * *", "day of month 32, outside 1-31"),
        ("0 0 * 13 *", "month 13, outside 1-12"),
        ("0 0 * * 8", "day of week 8, outside 0-7"),
        ("* * * *", "4 fields, not 5"),
        ("* * * * * *", "6 fields, not 5"),
        ("*/0 * * * *", "is not valid"),
        ("a b c d e", "is not valid"),
        ("@fortnightly", "is no alias"),
        ("@every 0s", "has no interval"),
        ("@every soon", "is not an interval"),
        ("0 0 30 2 *", "never fires"),
    ],
)
def test_an_invalid_expression_is_refused_naming_the_job_and_the_expression(expression, complaint):
    with pytest.raises(InvalidSchedule) as refused:
        schedule_for("nightly_report", parse_schedule(expression, job="nightly_report"), UTC_ZONE)
    assert "'nightly_report'" in str(refused.value)
    assert repr(expression) in str(refused.value)
    assert complaint in str(refused.value)


def test_a_periodic_option_that_is_not_a_schedule_is_refused():
    with pytest.raises(InvalidSchedule, match=r"'job'.*declare it with periodiq's cron"):
        schedule_for("job", "0 * * * *", UTC_ZONE)
