"""An operation's plan: a tree of steps run in sequence ("seq") or in parallel ("par").

Executors compose Dramatiq messages, ``pipeline``s and ``group``s (and other executors); the builder
turns them into this tree, stored as JSON on the operation's row. The middleware walks the tree as
steps complete: a sequence starts its next child, a parallel node completes once every child has.
Unlike Dramatiq's own pipelines (the rest of the chain nested in each message) and group callbacks (a
counter a redelivered member decrements twice), completion here is recorded once per node, so a fan-in
fires exactly once and a failed step stops everything after it.

Paths name nodes: "" is the root, "0.2" the third child of the root's first child.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import dramatiq
from dramatiq import Message

from resources.config import get_settings
from resources.errors import InvalidArgument

__all__ = [
    "OPTION_CALLBACK",
    "OPTION_NODE",
    "OPTION_OPERATION",
    "OPTION_RESOURCE",
    "OPTION_THROTTLE",
    "Advance",
    "Composable",
    "Party",
    "PlanBuilder",
    "advance",
    "ancestors",
    "checked_encoding",
    "finishing_alone",
    "message_fields",
    "message_of",
    "next_in_sequence",
    "node_at",
    "start_paths",
    "step_paths",
]

#: Message options every message of an operation carries.
OPTION_OPERATION = "operation_id"
OPTION_NODE = "plan_node"
OPTION_RESOURCE = "resource"
#: Set on callback messages that are not nodes of the plan ("failure").
OPTION_CALLBACK = "operation_callback"
#: On every step of a throttled operation: [[scope key, limit], ...], sorted by key.
OPTION_THROTTLE = "throttle"

Node = dict[str, Any]


@runtime_checkable
class Composable(Protocol):
    """Anything besides Dramatiq messages/pipelines/groups that can be a stage (a nested executor)."""

    def build_node(self, builder: PlanBuilder) -> Node | None: ...


@dataclass
class Party:
    """A resource taking part in the operation, with the messages to run if the operation fails."""

    ref: str
    executor: str
    on_failure: list[dict[str, Any]] = field(default_factory=list)
    #: Path of the node whose completion means this party's work is done ("" for the root party).
    path: str | None = None


class PlanBuilder:
    """Turns composed work into the plan tree; one builder per operation."""

    def __init__(self, operation_id: str, *, queue_name: str | None = None) -> None:
        self.operation_id = operation_id
        #: When set (heavy operations), every message of the operation goes to this queue.
        self.queue_name = queue_name
        self.parties: list[Party] = []
        self._current_party = 0
        #: Throttle scopes of the whole operation: key -> limit (the strictest one asked for).
        self.throttle: dict[str, int] = {}
        #: The finished plan as JSON, its messages checked (see ``finish``).
        self.encoded = ""

    def add_throttle(self, scopes: Iterable[tuple[str, int]]) -> None:
        """The operation holds a slot in each scope from its first step to its end."""
        for key, limit in scopes:
            self.throttle[key] = min(limit, self.throttle.get(key, limit))

    def add_party(self, ref: str, executor: str) -> int:
        self.parties.append(Party(ref=ref, executor=executor))
        return len(self.parties) - 1

    def set_failure(self, party: int, signature: Any) -> None:
        self.parties[party].on_failure = [
            self.stamp(m, party, callback="failure") for m in _flatten_messages(signature)
        ]

    def node_for_party(self, party: int, work: Any) -> Node | None:
        """Build ``work`` with its steps attributed to ``party`` (whose resource they act on)."""
        previous, self._current_party = self._current_party, party
        try:
            return self.node(work)
        finally:
            self._current_party = previous

    def node(self, work: Any) -> Node | None:
        """Convert a message, pipeline, group, list (a sequence) or Composable into a node; None if empty."""
        if work is None:
            return None
        if isinstance(work, Message):
            return {"kind": "step", "message": self.stamp(work, self._current_party)}
        if isinstance(work, dramatiq.pipeline):
            return self._compound("seq", work.messages)
        if isinstance(work, dramatiq.group):
            return self._compound("par", work.children)
        if isinstance(work, list | tuple):
            return self._compound("seq", work)
        if isinstance(work, Composable):  # after the cheap checks: a Protocol's isinstance is slow
            return work.build_node(self)
        raise TypeError(
            f"cannot compose {work!r} ({type(work).__name__}) into an operation; use a dramatiq Message "
            "(actor.message(...)), pipeline, group, a list of those, or an executor's stage(...)"
        )

    def _compound(self, kind: str, children: Iterable[Any]) -> Node | None:
        nodes = [n for n in (self.node(child) for child in children) if n is not None]
        if not nodes:
            return None
        if len(nodes) == 1:
            return nodes[0]
        return {"kind": kind, "children": nodes}

    def stamp(self, message: Message, party: int, *, callback: str | None = None) -> dict[str, Any]:
        options = {k: v for k, v in message.options.items() if k != "pipe_target"}
        options[OPTION_OPERATION] = self.operation_id
        options[OPTION_RESOURCE] = self.parties[party].ref
        if callback:
            options[OPTION_CALLBACK] = callback
        # Not message.copy(): it merges options, and Dramatiq's pipe_target must go. Checked in finish().
        return {**message_fields(message), "queue_name": self.queue_name or message.queue_name, "options": options}

    def finish(self, root: Node | None) -> dict[str, Any]:
        """The plan as stored: node paths stamped on every step message."""
        throttle = [[key, self.throttle[key]] for key in sorted(self.throttle)]
        if root is not None:
            for path in step_paths(root):
                options = node_at(root, path)["message"]["options"]
                options[OPTION_NODE] = path
                if throttle:
                    options[OPTION_THROTTLE] = throttle
            for path, node in _walk(root, ""):
                for party in node.get("parties", ()):
                    self.parties[party].path = path
        if self.parties:
            self.parties[0].path = ""
        plan = {
            "root": root,
            "parties": [vars(p) for p in self.parties],
            OPTION_THROTTLE: throttle,
        }
        self.encoded = checked_encoding(plan)
        return plan


def message_fields(message: Message) -> dict[str, Any]:
    """``message.asdict()``, without its walk over the dataclass's fields (several messages per ``execute()``)."""
    return {
        "queue_name": message.queue_name,
        "actor_name": message.actor_name,
        "args": message.args,
        "kwargs": message.kwargs,
        "options": message.options,
        "message_id": message.message_id,
        "message_timestamp": message.message_timestamp,
    }


def checked_encoding(plan: dict[str, Any]) -> str:
    """The plan as compact JSON, once every message in it is known to travel (``check_message``). One encoding of
    the whole plan checks them all and is what its row stores: a message is never larger than the plan holding it.
    Each message is checked on its own, to name the one at fault, only when the plan is not JSON or is larger
    than a message may be."""
    try:
        text = json.dumps(plan, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        text = None
    if text is None or len(text) > get_settings().max_message_bytes:
        root = plan["root"]
        steps = [node_at(root, path)["message"] for path in step_paths(root)] if root is not None else []
        for fields in [*steps, *(m for party in plan["parties"] for m in party["on_failure"])]:
            check_message(fields)
    return text if text is not None else json.dumps(plan, separators=(",", ":"))


def check_message(fields: dict[str, Any]) -> None:
    """Refuse a message that cannot travel: arguments that are not JSON (the broker would refuse them
    after the commit, or Dramatiq's encoder would turn them into something else), or an encoded message
    larger than ``JOBS_MAX_MESSAGE_BYTES``."""
    actor = fields["actor_name"]
    try:
        # One encoding serves both checks; ASCII (json's default), so its length is its size in bytes.
        size = len(json.dumps(fields, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError):
        for name, value in [*enumerate(fields["args"]), *fields["kwargs"].items()]:
            check_json(value, f"argument {name!r} of {actor}")
        size = len(json.dumps(fields, separators=(",", ":")))  # no argument is to blame: as Dramatiq would
    limit = get_settings().max_message_bytes
    if size > limit:
        raise InvalidArgument(
            f"a message of {actor} would be {size} bytes, over JOBS_MAX_MESSAGE_BYTES={limit}; store large "
            "data in the database and pass a reference to it"
        )


def check_json(value: Any, what: str) -> None:
    """Refuse a value that JSON cannot carry as it is, naming ``what`` it is."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(
            f"{what} is {type(value).__name__} {_clip(repr(value))}, which is not JSON ({error}); pass JSON "
            "values (str, int, float, bool, None, lists and dicts of them), e.g. a resource's ref or uuid "
            "instead of the object"
        ) from None


def _clip(text: str, length: int = 80) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _flatten_messages(signature: Any) -> list[Message]:
    if signature is None:
        return []
    if isinstance(signature, Message):
        return [signature]
    if isinstance(signature, dramatiq.pipeline):
        return list(signature.messages)
    if isinstance(signature, dramatiq.group | list | tuple):
        children = signature.children if isinstance(signature, dramatiq.group) else signature
        return [m for child in children for m in _flatten_messages(child)]
    raise TypeError(f"a failure signature must be messages, not {type(signature).__name__}")


def _walk(node: Node, path: str) -> Iterable[tuple[str, Node]]:
    yield path, node
    for i, child in enumerate(node.get("children", ())):
        yield from _walk(child, _join(path, i))


def _join(path: str, index: int) -> str:
    return f"{path}.{index}" if path else str(index)


def _split(path: str) -> tuple[str, int]:
    parent, _, index = path.rpartition(".")
    return parent, int(index)


def node_at(root: Node, path: str) -> Node:
    node = root
    if path:
        for index in path.split("."):
            node = node["children"][int(index)]
    return node


def message_of(root: Node, path: str) -> Message:
    return Message(**node_at(root, path)["message"])


def start_paths(node: Node, path: str) -> list[str]:
    """The steps to enqueue to start ``node``: its first step, or the first step of every branch."""
    if node["kind"] == "step":
        return [path]
    if node["kind"] == "seq":
        return start_paths(node["children"][0], _join(path, 0))
    return [p for i, child in enumerate(node["children"]) for p in start_paths(child, _join(path, i))]


def ancestors(path: str) -> list[str]:
    """The paths of every node above ``path``, nearest first ("" last)."""
    result = []
    while path:
        path, _ = _split(path)
        result.append(path)
    return result


def step_paths(node: Node, path: str = "") -> list[str]:
    if node["kind"] == "step":
        return [path]
    return [p for i, child in enumerate(node["children"]) for p in step_paths(child, _join(path, i))]


@dataclass(frozen=True)
class Advance:
    #: Nodes completed by this step: the step itself and every ancestor it completed.
    completed: list[str]
    #: Steps to enqueue next.
    start: list[str]
    #: True when the root completed: the operation succeeded.
    finished: bool


def next_in_sequence(root: Node, path: str) -> list[str] | None:
    """The steps that follow step ``path`` when it is a step of a sequence with more after it, whose
    completion then completes no other node (``advance`` agrees, whatever is done); else None. Pure."""
    if not path:
        return None
    parent_path, index = _split(path)
    parent = node_at(root, parent_path)
    if parent["kind"] != "seq" or index + 1 >= len(parent["children"]):
        return None
    return start_paths(parent["children"][index + 1], _join(parent_path, index + 1))


def finishing_alone(root: Node, path: str) -> list[str] | None:
    """When the completion of step ``path`` ends the whole plan whatever else is recorded (it is the last step,
    and no group is above it): the nodes it completes, as ``advance`` would list them. Else None. Pure."""
    completed = [path]
    while path:
        parent_path, index = _split(path)
        parent = node_at(root, parent_path)
        if parent["kind"] != "seq" or index + 1 < len(parent["children"]):
            return None
        path = parent_path
        completed.append(path)
    return completed


def advance(root: Node, done: set[str], path: str) -> Advance:
    """What follows the completion of step ``path``, given the nodes already ``done``. Pure."""
    completed = [path]
    done = done | {path}
    while path:
        parent_path, index = _split(path)
        parent = node_at(root, parent_path)
        if parent["kind"] == "seq":
            if index + 1 < len(parent["children"]):
                following = _join(parent_path, index + 1)
                return Advance(completed, start_paths(parent["children"][index + 1], following), False)
        elif not all(_join(parent_path, i) in done for i in range(len(parent["children"]))):
            return Advance(completed, [], False)
        path = parent_path
        completed.append(path)
        done.add(path)
    return Advance(completed, [], True)
