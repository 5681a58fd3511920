"""The throughput benchmark's pure parts: options, the JSON object from made-up timings, ratios, URLs, the
profile summary (no worker processes, no servers)."""

from __future__ import annotations

import cProfile
import json
import pstats
import time
from contextlib import ExitStack

import pytest

from benchmarks import throughput
from benchmarks.cpu import CpuReading, machine_cpu_s
from benchmarks.throttle import Environment
from benchmarks.throughput import (
    REPO_ROOT,
    VARIANTS,
    CeleryChains,
    Executors,
    Options,
    Run,
    VariantOutcome,
    build_result,
    celery_broker_url,
    parse_options,
    profile_summary,
    ratio,
    round_order,
    short_location,
    shown_database_url,
)

REQUIRED_KEYS = {
    "plain_dramatiq_ops_per_s",
    "executors_ops_per_s",
    "celery_ops_per_s",
    "ratio_vs_dramatiq",
    "ratio_vs_celery",
    "database",
    "operations",
    "processes",
    "threads",
    "machine",
}
MACHINE = {"cpus": 2, "python": "3.11.0", "platform": "Linux", "load_average_at_start": 0.5, "redis": "embedded"}


def _outcome(*seconds: float, operations: int = 300, cpu_s: float | None = None) -> VariantOutcome:
    return VariantOutcome(workers="w", runs=[Run(operations, enqueue_s=0.1, total_s=s, cpu_s=cpu_s) for s in seconds])


def test_defaults_are_two_processes_of_four_threads_and_300_operations_on_sqlite():
    options = parse_options([])

    assert (options.operations, options.processes, options.threads) == (300, 2, 4)
    assert options.database == "sqlite"
    assert options.variants == VARIANTS
    assert not options.json_output
    assert options.warm_up == 4 * 2 * 4  # four operations per worker thread


def test_flags_set_the_sizes_database_and_variants():
    options = parse_options(
        [
            "--json",
            "--operations",
            "50",
            "--processes",
            "3",
            "--threads",
            "2",
            "--database",
            "postgresql",
            "--rounds",
            "1",
            "--variants",
            "executors",
            "executors",
            "celery",
            "--celery-pool",
            "prefork",
        ]
    )

    assert options.json_output
    assert (options.operations, options.processes, options.threads, options.rounds) == (50, 3, 2, 1)
    assert options.database == "postgresql"
    assert options.variants == ("executors", "celery")  # duplicates dropped, order kept
    assert options.celery_pool == "prefork"
    assert options.warm_up == 4 * 3 * 2


@pytest.mark.parametrize(
    "argv",
    [["--operations", "0"], ["--threads", "-1"], ["--database", "mysql"], ["--variants", "rq"], ["--timeout", "0"]],
)
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_options(argv)
    assert "error" in capsys.readouterr().err


def test_the_variants_take_turns_starting_one_further_along_each_round():
    orders = [round_order(VARIANTS, index) for index in range(4)]
    assert orders == [
        ["plain_dramatiq", "executors", "celery"],
        ["executors", "celery", "plain_dramatiq"],
        ["celery", "plain_dramatiq", "executors"],
        ["plain_dramatiq", "executors", "celery"],
    ]
    assert round_order(("executors",), 5) == ["executors"]
    assert round_order((), 0) == []


def test_each_round_logs_to_files_of_its_own_and_a_variant_reads_only_its_own(tmp_path):
    environment = Environment(directory=tmp_path, namespace="n", redis="embedded", database="sqlite")
    executors, celery = Executors(environment, Options()), CeleryChains(environment, Options())
    environment.logs.mkdir()
    for round_ in (1, 2):
        executors.round = celery.round = round_
        for path in (executors.log_path(), celery.log_path("-1"), celery.log_path("-2")):
            path.write_text("")
    assert [p.name for p in executors.log_paths()] == ["executors-round-1.log", "executors-round-2.log"]
    assert [p.name for p in celery.log_paths()] == [
        "celery-round-1-1.log",
        "celery-round-1-2.log",
        "celery-round-2-1.log",
        "celery-round-2-2.log",
    ]


def test_the_executors_workers_log_from_warning_as_celerys_do(tmp_path, monkeypatch):
    # Given the executors' variant, with the worker start captured
    environment = Environment(directory=tmp_path, namespace="n", redis="embedded", database="sqlite")
    executors = Executors(environment, Options())
    started: list[dict] = []
    monkeypatch.setattr(throughput, "start_worker", lambda name, **kwargs: started.append(kwargs))
    monkeypatch.setattr(Executors, "_keep", lambda self, stack, worker: None)

    # When its workers start, Then they log from WARNING (no line per operation), as Celery's workers do
    executors.start(ExitStack())
    assert started[0]["env"]["JOBS_LOG_LEVEL"] == "warning"


def test_ratio_is_rounded_and_none_without_both_figures():
    assert ratio(50.0, 200.0) == 0.25
    assert ratio(1.0, 3.0) == 0.333
    assert ratio(None, 100.0) is None
    assert ratio(100.0, None) is None
    assert ratio(100.0, 0.0) is None


def test_a_variant_counts_the_median_of_its_rounds():
    # 300 operations in 1, 2 and 3 s: 300, 150 and 100 ops/s
    assert _outcome(1.0, 2.0, 3.0).ops_per_s() == 150.0
    assert _outcome(2.0, 1.0).ops_per_s() == 225.0
    assert VariantOutcome(runs=[Run(300, 0.1, 1.0)], error="TimeoutError: …").ops_per_s() is None
    assert VariantOutcome().ops_per_s() is None


def test_the_json_object_from_fake_timings():
    options = Options(operations=300, processes=2, threads=4, database="postgresql", rounds=2)
    outcomes = {
        "plain_dramatiq": _outcome(1.0, 1.0),  # 300 ops/s
        "executors": _outcome(4.0, 6.0, cpu_s=9.0),  # 75 and 50: median 62.5; 30 CPU ms an operation
        "celery": _outcome(2.5, 2.5),  # 120 ops/s; its CPU time could not be read
    }

    result = build_result(
        options, outcomes, database_url="postgresql+psycopg://u:***@h/bench_x", machine=MACHINE, duration_s=12.34
    )

    assert set(result) >= REQUIRED_KEYS
    assert result["plain_dramatiq_ops_per_s"] == 300.0
    assert result["executors_ops_per_s"] == 62.5
    assert result["celery_ops_per_s"] == 120.0
    assert result["ratio_vs_dramatiq"] == round(62.5 / 300, 3)
    assert result["ratio_vs_celery"] == round(62.5 / 120, 3)
    assert (result["database"], result["operations"], result["processes"], result["threads"]) == (
        "postgresql",
        300,
        2,
        4,
    )
    assert result["machine"] == MACHINE
    assert result["variants"]["executors"]["runs_ops_per_s"] == [75.0, 50.0]
    assert result["cpu_ms_per_op"] == {"plain_dramatiq": None, "executors": 30.0, "celery": None}
    assert result["variants"]["executors"]["cpu_ms_per_op"] == 30.0
    assert result["duration_s"] == 12.3
    assert json.loads(json.dumps(result)) == result  # one JSON object, nothing that does not serialize


def test_a_failed_or_skipped_variant_leaves_its_figure_and_ratios_empty():
    outcomes = {"plain_dramatiq": _outcome(1.0), "executors": VariantOutcome(error="RuntimeError: workers died")}

    result = build_result(Options(), outcomes, database_url="sqlite://", machine=MACHINE, duration_s=1.0)

    assert result["plain_dramatiq_ops_per_s"] == 300.0
    assert result["executors_ops_per_s"] is None
    assert result["celery_ops_per_s"] is None  # not run
    assert result["ratio_vs_dramatiq"] is None
    assert result["ratio_vs_celery"] is None
    assert result["variants"]["executors"]["error"] == "RuntimeError: workers died"
    assert "celery" not in result["variants"]


def test_the_database_url_shows_neither_password_nor_temporary_directory(tmp_path):
    assert shown_database_url("postgresql+psycopg://bench:s3cret@db:5432/bench_ab") == (
        "postgresql+psycopg://bench:***@db:5432/bench_ab"
    )
    shown = shown_database_url(f"sqlite:///{tmp_path / 'bench.sqlite3'}", tmp_path)
    assert shown == "sqlite:///<temporary directory>/bench.sqlite3"


def test_celery_gets_kombus_spelling_of_a_unix_socket_url():
    assert celery_broker_url("unix:///tmp/r/redis.sock?db=0") == "redis+socket:///tmp/r/redis.sock?virtual_host=0"
    assert celery_broker_url("unix:///tmp/r/redis.sock") == "redis+socket:///tmp/r/redis.sock"
    assert celery_broker_url("redis://127.0.0.1:6379/3") == "redis://127.0.0.1:6379/3"


def test_profiled_locations_name_no_path_of_the_machine():
    assert short_location(str(REPO_ROOT / "middleware" / "progress.py")) == "middleware/progress.py"
    site = REPO_ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "sqlalchemy" / "orm" / "session.py"
    assert short_location(str(site)) == "sqlalchemy/orm/session.py"
    assert short_location("/usr/lib/python3.11/threading.py") == "threading.py"
    assert short_location("~") == "~"


def _busy(n: int) -> int:
    return sum(i * i for i in range(n))


def test_the_profile_summary_counts_per_unit():
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(4):
        _busy(20_000)
    profile.disable()

    summary = profile_summary(pstats.Stats(profile), count=4, unit="step", top=5)

    assert (summary["unit"], summary["count"]) == ("step", 4)
    names = [row["function"] for row in summary["project_by_cumulative"]]
    assert any(name.startswith("tests/unit/test_throughput_benchmark.py:") and "_busy" in name for name in names)
    busy = next(row for row in summary["project_by_cumulative"] if "(_busy)" in row["function"])
    assert busy["calls"] == 4
    assert busy["cumulative_ms_each"] > 0
    assert len(summary["all_by_own_time"]) <= 5
    json.dumps(summary)


def test_the_machines_cpu_time_is_read_and_grows_with_work():
    before = machine_cpu_s()
    if before is None:
        pytest.skip("no /proc/stat here")
    # Busy until the machine has counted 50 ms more (its clock ticks are 10 ms), for 30 s at most
    give_up = time.monotonic() + 30
    now = before
    while now is not None and now < before + 0.05 and time.monotonic() < give_up:
        now = machine_cpu_s()
    assert now is not None and now >= before + 0.05


def test_a_rounds_cpu_is_split_into_this_process_the_workers_redis_and_the_rest():
    before = CpuReading(machine=10.0, this_process=1.0, workers=2.0, redis=0.5)
    after = CpuReading(machine=13.0, this_process=1.5, workers=3.5, redis=0.75)
    assert after.since(before) == {"machine": 3.0, "this_process": 0.5, "workers": 1.5, "redis": 0.25, "rest": 0.75}
    # A part that cannot be read leaves the rest unknown, not wrong
    blind = CpuReading(machine=13.0, this_process=1.5, workers=3.5, redis=None)
    assert blind.since(before)["rest"] is None and blind.since(before)["workers"] == 1.5


def test_each_parts_cost_per_operation_is_the_median_round():
    def round_with(workers_s: float) -> Run:
        parts = {"this_process": 0.3, "workers": workers_s, "redis": 0.1, "rest": None}
        return Run(100, 0.1, 1.0, cpu_s=1.0, cpu_parts=parts)

    outcome = VariantOutcome(runs=[round_with(0.5), round_with(0.9), round_with(0.6)])
    assert outcome.cpu_ms_per_op_by_part() == {"this_process": 3.0, "workers": 6.0, "redis": 1.0, "rest": None}
    result = build_result(Options(), {"executors": outcome}, database_url="sqlite://", machine={}, duration_s=1.0)
    assert result["cpu_ms_per_op_by_part"]["executors"]["workers"] == 6.0
    assert result["variants"]["executors"]["cpu_ms_per_op_by_part"]["redis"] == 1.0
