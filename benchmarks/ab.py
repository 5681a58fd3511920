"""This checkout's executors against another revision's, their throughput rounds taking turns in one run.

Run from the repository root::

    python -m benchmarks.ab --base HEAD~1 --json             # 10 pairs of rounds of 1,000 operations, on SQLite
    python -m benchmarks.ab --base main --pairs 20 --database postgresql

Throughput on a shared machine swings by a fifth from one minute to the next, as other tenants take the CPUs:
two runs of ``benchmarks.throughput``, one before a change and one after, cannot show a change of ten percent.
Here each round is a child ``python -m benchmarks.throughput --json --variants executors --rounds 1``, run
alternately from a copy of this checkout (its files as they are now, uncommitted changes and new files included)
and from a copy of ``--base`` (``git archive``), each with its own code in the caller and in the workers, so that a
slow spell of the machine falls on both sides. Both copies sit in one temporary directory, so neither side runs
from a different disk, and both run on this environment's Python and packages (a base that needs other
dependencies cannot be compared this way). Pair i runs this checkout first when i is even and the base first when
it is odd.

The figures: each pair's ratio of this checkout's operations per second to the base's, their median, how many
pairs this checkout won, and each side's median operations per second and CPU milliseconds per operation (the
whole machine's, as ``benchmarks.throughput`` reads them). Run against itself, ten pairs of 1,000 operations gave
medians within 5% of 1: a smaller change needs more pairs. Every child removes the workers, keys, rows and files it
made; the copies are removed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .entry import report
from .throughput import DATABASES, REPO_ROOT

__all__ = ["Pair", "RoundFigures", "child_command", "main", "pair_order", "summarize"]

SIDES = ("this", "base")

console = Console(stderr=True)


@dataclass(frozen=True)
class RoundFigures:
    """One child's round: the executors' operations per second and the machine's CPU milliseconds per operation."""

    ops_per_s: float
    cpu_ms_per_op: float | None


@dataclass(frozen=True)
class Pair:
    this: RoundFigures
    base: RoundFigures

    @property
    def ratio(self) -> float:
        return self.this.ops_per_s / self.base.ops_per_s if self.base.ops_per_s > 0 else 0.0


def pair_order(index: int) -> tuple[str, str]:
    """Which side runs first in pair ``index``: this checkout in even pairs, the base in odd ones."""
    return SIDES if index % 2 == 0 else SIDES[::-1]


def child_command(operations: int, database: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.throughput",
        "--json",
        "--variants",
        "executors",
        "--rounds",
        "1",
        "--operations",
        str(operations),
        "--database",
        database,
    ]


def figures_of(result: dict[str, Any]) -> RoundFigures:
    """The executors' figures in a child's JSON object; an error the child reported is raised."""
    executors = result["variants"]["executors"]
    if executors.get("error"):
        raise RuntimeError(f"the executors' round failed: {executors['error']}")
    return RoundFigures(float(result["executors_ops_per_s"]), executors.get("cpu_ms_per_op"))


def summarize(pairs: Sequence[Pair]) -> dict[str, Any]:
    """The pairs' ratios and each side's medians."""

    def median_of(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return round(statistics.median(known), 2) if known else None

    return {
        "median_ratio": round(statistics.median(pair.ratio for pair in pairs), 3) if pairs else None,
        "this_higher_in": sum(pair.ratio > 1 for pair in pairs),
        "this_ops_per_s": median_of([pair.this.ops_per_s for pair in pairs]),
        "base_ops_per_s": median_of([pair.base.ops_per_s for pair in pairs]),
        "this_cpu_ms_per_op": median_of([pair.this.cpu_ms_per_op for pair in pairs]),
        "base_cpu_ms_per_op": median_of([pair.base.cpu_ms_per_op for pair in pairs]),
        "pairs": [
            {
                "this_ops_per_s": pair.this.ops_per_s,
                "base_ops_per_s": pair.base.ops_per_s,
                "ratio": round(pair.ratio, 3),
            }
            for pair in pairs
        ],
    }


# -- the children and the base's copy -------------------------------------------------------------------------


def _git(*args: str) -> bytes:
    done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, check=False)
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip()
        raise SystemExit(f"git {' '.join(args)} failed: {error}. Give --base a revision of this repository")
    return done.stdout


def export_revision(revision: str, directory: Path) -> str:
    """Write the files of ``revision`` into ``directory``; return its short commit id."""
    commit = _git("rev-parse", "--short", "--verify", f"{revision}^{{commit}}").decode().strip()
    # Python's own safe extraction where it has it (3.11.4 on); the archive is this repository's anyway.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(fileobj=io.BytesIO(_git("archive", commit)), mode="r:") as archive:
        archive.extractall(directory, **safe)
    return commit


def copy_checkout(directory: Path) -> None:
    """Copy this checkout's files as they are now (tracked ones and new ones git does not ignore) into ``directory``."""
    listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the checkout is left out, as the checkout has it
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_child(tree: Path, operations: int, database: str) -> RoundFigures:
    """One round of the executors with the code in ``tree``, in the caller and in the workers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        child_command(operations, database), cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        stdout, stderr = child.communicate()
    except BaseException:
        # Stopped here (Ctrl-C, SIGTERM): the child, too, unwinds and removes what it made (benchmarks.entry).
        child.send_signal(signal.SIGTERM)
        child.communicate()
        raise
    if child.returncode != 0 or not stdout.strip():
        tail = stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"the round from {tree} exited {child.returncode}:\n{tail}")
    return figures_of(json.loads(stdout))


def run(
    base: str,
    pairs: int,
    operations: int,
    database: str,
    run_round: Callable[[Path, int, str], RoundFigures] = run_child,
) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="jobs-ab-") as directory:
        trees = {side: Path(directory) / side for side in SIDES}
        for tree in trees.values():
            tree.mkdir()
        commit = export_revision(base, trees["base"])
        copy_checkout(trees["this"])
        done: list[Pair] = []
        for index in range(pairs):
            figures = {side: run_round(trees[side], operations, database) for side in pair_order(index)}
            done.append(Pair(figures["this"], figures["base"]))
            console.print(
                f"pair {index + 1}: this {figures['this'].ops_per_s:.1f}, base {figures['base'].ops_per_s:.1f} "
                f"operations/s ({done[-1].ratio:.3f})"
            )
    return {
        "base_revision": commit,
        **summarize(done),
        "database": database,
        "operations": operations,
        "duration_s": round(time.monotonic() - started, 1),
    }


def render(result: dict[str, Any], out: Console) -> None:
    table = Table(title=f"executors' operations/s: this checkout against {result['base_revision']}")
    for column in ("pair", "this", "base", "this / base"):
        table.add_column(column)
    for index, pair in enumerate(result["pairs"], 1):
        table.add_row(
            str(index), f"{pair['this_ops_per_s']:.1f}", f"{pair['base_ops_per_s']:.1f}", f"{pair['ratio']:.3f}"
        )
    out.print(table)
    out.print(
        f"median ratio {result['median_ratio']}; this checkout higher in {result['this_higher_in']} of "
        f"{len(result['pairs'])} pairs; CPU ms/op {result['this_cpu_ms_per_op']} against {result['base_cpu_ms_per_op']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare this checkout with (HEAD~1, main...)")
    parser.add_argument("--pairs", type=int, default=10, help="pairs of rounds (default 10)")
    parser.add_argument("--operations", type=int, default=1000, help="operations per round (default 1000)")
    parser.add_argument("--database", choices=DATABASES, default="sqlite", help="the executors' database")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    options = parser.parse_args(argv)
    if options.pairs < 1 or options.operations < 1:
        parser.error("--pairs and --operations must be positive")
    return report(
        lambda: run(options.base, options.pairs, options.operations, options.database),
        json_output=options.json,
        render=render,
        undone="the round under way stopped",
    )


if __name__ == "__main__":
    sys.exit(main())
