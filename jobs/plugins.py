"""Where packages of a layer above this one plug in, so that this layer never imports them: through
packaging entry points (pyproject.toml), the standard way for one installed package to find another's
parts. The scheduler declares its actors' module and its section of ``python -m jobs status`` here."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

__all__ = ["ACTOR_MODULES", "SCHEDULER_STATUS", "load_actor_modules", "scheduler_status_provider"]

#: Modules that declare actors on the project's broker (value: a module name).
ACTOR_MODULES = "cloud_jobs.actors"
#: A callable returning the scheduler's section of the status (value: ``module:function``).
SCHEDULER_STATUS = "cloud_jobs.scheduler_status"


def load_actor_modules() -> list[str]:
    """Import every registered actor module, so that every actor is declared; returns their names."""
    loaded = []
    for entry_point in entry_points(group=ACTOR_MODULES):
        entry_point.load()
        loaded.append(entry_point.value)
    return loaded


def scheduler_status_provider() -> Callable[[], Any] | None:
    """The registered scheduler-status callable, or None when no scheduler package is installed."""
    for entry_point in entry_points(group=SCHEDULER_STATUS):
        provider: Callable[[], Any] = entry_point.load()
        return provider
    return None
