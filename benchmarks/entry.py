"""What every benchmark's ``main`` does around its run: Ctrl-C and SIGTERM unwind the run (so it removes what
it made), and the result is printed as one JSON object or as a table."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from rich.console import Console

__all__ = ["INTERRUPTED", "report"]

#: Exit status of a run stopped by Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _clean_up_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so a benchmark stopped either way removes what it made."""
    signal.signal(signal.SIGTERM, _interrupt)


def report(
    run: Callable[[], dict[str, Any]],
    *,
    json_output: bool,
    render: Callable[[dict[str, Any], Console], None],
    exit_status: Callable[[dict[str, Any]], int] = lambda result: 0,
    undone: str = "workers stopped and keys deleted",
) -> int:
    """Run the benchmark and print its result; the exit status is ``exit_status(result)``, or 130 when it
    was interrupted (``undone`` says what was cleaned up then)."""
    _clean_up_on_sigterm()
    try:
        result = run()
    except KeyboardInterrupt:
        Console(stderr=True).print(f"[red]interrupted; {undone}[/]")
        return INTERRUPTED
    if json_output:
        print(json.dumps(result, indent=2))
    else:
        render(result, Console())
    return exit_status(result)
