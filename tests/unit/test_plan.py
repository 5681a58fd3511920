"""The plan walk, checked against every order in which parallel steps may complete."""

from __future__ import annotations

import dramatiq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.actors import state_transition
from middleware.plan import PlanBuilder, advance, start_paths, step_paths

trees = st.recursive(
    st.just({"kind": "step"}),
    lambda children: st.builds(
        lambda kind, nodes: {"kind": kind, "children": nodes},
        st.sampled_from(["seq", "par"]),
        st.lists(children, min_size=2, max_size=4),
    ),
    max_leaves=12,
)


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts))]


@settings(max_examples=300, deadline=None)
@given(root=trees, data=st.data())
def test_every_step_starts_once_and_the_root_finishes_once(root, data):
    # Given a plan tree, and its first steps in flight
    in_flight = list(start_paths(root, ""))
    started, done, finishes = list(in_flight), set(), 0

    # When in-flight steps complete in any order
    while in_flight:
        path = in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1)))
        step = advance(root, done, path)
        done.update(step.completed)
        in_flight.extend(step.start)
        started.extend(step.start)
        finishes += step.finished
        # Then a step only ever starts after everything before it in a sequence has completed
        for new in step.start:
            for ancestor in _ancestors(new):
                assert ancestor not in done

    # ... every step started exactly once, and the operation finished exactly once, at the end
    assert sorted(started) == sorted(step_paths(root))
    assert finishes == 1
    assert "" in done


def test_builder_composes_pipelines_groups_and_lists():
    builder = PlanBuilder("op")
    builder.add_party("instance:" + "0" * 32, "X")
    a, b, c = (state_transition.message("instance:" + "0" * 32, name) for name in ("a", "b", "c"))
    root = builder.node([dramatiq.pipeline([a, b]), dramatiq.group([c, [a, None]]), None, []])
    assert root["kind"] == "seq"
    pipeline_node, group_node = root["children"]
    assert [child["kind"] for child in pipeline_node["children"]] == ["step", "step"]
    assert [child["kind"] for child in group_node["children"]] == ["step", "step"]  # [a, None] is just a
    # Dramatiq's own chaining is stripped: the plan, not the message, says what comes next
    assert all("pipe_target" not in s["message"]["options"] for s in pipeline_node["children"])


def test_builder_refuses_what_it_cannot_compose():
    builder = PlanBuilder("op")
    builder.add_party("instance:" + "0" * 32, "X")
    with pytest.raises(TypeError, match=r"cannot compose \{'actor': 'x'\} \(dict\)"):
        builder.node({"actor": "x"})
