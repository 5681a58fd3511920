"""The step being run in this thread: its operation, plan node, resource and attempt.

Actors read it instead of taking the operation as an argument, so executors can compose any actor
without threading the operation id through every signature. A ContextVar: actors run in threads.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .plan import OPTION_CALLBACK, OPTION_NODE, OPTION_OPERATION, OPTION_RESOURCE

__all__ = ["StepContext", "current_step", "step_context"]


@dataclass(frozen=True)
class StepContext:
    operation_id: str | None
    node: str | None
    resource_ref: str | None
    #: 0 for the first attempt, n for the n-th retry.
    attempt: int
    callback: str | None = None
    #: The throttle's grant number for the operation while this step runs (None: not throttled).
    throttle_fence: int | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> StepContext:
        return cls(
            operation_id=options.get(OPTION_OPERATION),
            node=options.get(OPTION_NODE),
            resource_ref=options.get(OPTION_RESOURCE),
            attempt=int(options.get("retries", 0)),
            callback=options.get(OPTION_CALLBACK),
        )

    def with_fence(self, throttle_fence: int | None) -> StepContext:
        """This context with the throttle's grant number: ``dataclasses.replace``'s result, built without its
        look at the fields (twice per step, before each step runs)."""
        return StepContext(self.operation_id, self.node, self.resource_ref, self.attempt, self.callback, throttle_fence)


_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("current_step", default=None)


def current_step() -> StepContext:
    """The running step's context; outside any operation, an empty one (operation_id None)."""
    return _CURRENT.get() or StepContext(None, None, None, 0)


@contextmanager
def step_context(context: StepContext) -> Iterator[StepContext]:
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def set_step_context(context: StepContext | None) -> None:
    """For middleware hooks, where entering and leaving happen in two different calls."""
    _CURRENT.set(context)
