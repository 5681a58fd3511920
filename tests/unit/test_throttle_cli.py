"""``python -m jobs throttle explain`` and ``set-limit``."""

from __future__ import annotations

import json
import uuid

from click.testing import CliRunner

from jobs.broker import broker as project_broker
from jobs.cli import main
from middleware import ThrottleScope, find_throttle


def test_explain_lists_holders_and_waiters_and_set_limit_admits_them(stub_broker):
    # Given a scope with one holder and one waiter
    store = find_throttle(project_broker).store
    scope = f"cli-{uuid.uuid4().hex[:8]}"
    store.acquire("holder", [ThrottleScope(scope, 1)], start=True)
    store.acquire("waiter", [ThrottleScope(scope, 1)], start=False, messages=[])
    runner = CliRunner()

    # When it is explained
    shown = json.loads(runner.invoke(main, ["throttle", "explain", scope, "--json"]).output)

    # Then the limit, holder and waiter are there
    assert shown["limit"] == 1
    assert [h["operation_id"] for h in shown["holders"]] == ["holder"]
    assert [w["operation_id"] for w in shown["waiters"]] == ["waiter"]

    # When its limit is raised, the waiter is admitted at once
    result = runner.invoke(main, ["throttle", "set-limit", scope, "2"])
    assert result.exit_code == 0, result.output
    assert "1 waiting operation(s) admitted" in result.output
    assert sorted(h.operation_id for h in store.explain(scope).holders) == ["holder", "waiter"]


def test_set_limit_refuses_a_limit_that_is_not_positive(stub_broker):
    result = CliRunner().invoke(main, ["throttle", "set-limit", "some-scope", "0"])
    assert result.exit_code != 0
    assert "positive integer" in result.output
