"""The resource state machine: Waldur's eight states and their named transitions."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["TRANSITIONAL_STATES", "TRANSITIONS", "State", "Transition", "get_transition"]


class State(enum.StrEnum):
    CREATION_SCHEDULED = "CREATION_SCHEDULED"
    CREATING = "CREATING"
    UPDATE_SCHEDULED = "UPDATE_SCHEDULED"
    UPDATING = "UPDATING"
    DELETION_SCHEDULED = "DELETION_SCHEDULED"
    DELETING = "DELETING"
    OK = "OK"
    ERRED = "ERRED"


#: States in which an operation is expected to be under way.
TRANSITIONAL_STATES = frozenset(State) - {State.OK, State.ERRED}


@dataclass(frozen=True)
class Transition:
    name: str
    sources: frozenset[State]
    target: State
    #: A transition that starts a new operation stamps its id on the resource instead of checking it.
    starts_operation: bool = False

    def describe_sources(self) -> str:
        if self.sources == frozenset(State):
            return "any state"
        return " or ".join(sorted(self.sources))


_ANY = frozenset(State)

TRANSITIONS: dict[str, Transition] = {
    t.name: t
    for t in (
        Transition("begin_creating", frozenset({State.CREATION_SCHEDULED}), State.CREATING),
        Transition("schedule_updating", frozenset({State.OK, State.ERRED}), State.UPDATE_SCHEDULED, True),
        Transition("begin_updating", frozenset({State.UPDATE_SCHEDULED}), State.UPDATING),
        Transition("schedule_deleting", frozenset({State.OK, State.ERRED}), State.DELETION_SCHEDULED, True),
        Transition("begin_deleting", frozenset({State.DELETION_SCHEDULED}), State.DELETING),
        Transition("set_ok", _ANY, State.OK),
        Transition("set_erred", _ANY, State.ERRED),
        Transition("recover", frozenset({State.ERRED}), State.OK),
    )
}


def get_transition(name: str) -> Transition:
    try:
        return TRANSITIONS[name]
    except KeyError:
        known = ", ".join(TRANSITIONS)
        raise ValueError(f"unknown transition {name!r}; use one of: {known}") from None
