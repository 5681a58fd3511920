"""JSON columns store text encoded beforehand as it is, and encode anything else as SQLAlchemy's JSON type does;
an operation's row stores the plan its messages were checked against."""

from __future__ import annotations

import json

from sqlalchemy import select

from benchmarks.noop import NoopExecutor
from resources.db import session_scope
from resources.json_columns import EncodedJSON, serialize_json
from resources.models import Operation
from tests.fixtures import make_instance, make_tenant


def test_encoded_text_is_stored_as_it_is_and_anything_else_is_encoded():
    assert serialize_json(EncodedJSON('{"a":1}')) == '{"a":1}'
    assert serialize_json({"a": 1}) == json.dumps({"a": 1})
    assert serialize_json('{"a":1}') == json.dumps('{"a":1}')  # a plain string is a JSON string


def test_an_operations_plan_reads_back_as_built(stub_broker):
    instance = make_instance(make_tenant(), volumes=0)
    handle = NoopExecutor.execute(instance, counter="unused", steps=3)
    with session_scope() as session:
        plan = session.scalars(select(Operation.plan).where(Operation.id == handle.id)).one()
    steps = plan["root"]["children"]
    assert [step["message"]["options"]["plan_node"] for step in steps] == ["0", "1", "2"]
    assert steps[-1]["message"]["args"] == ["unused"]
