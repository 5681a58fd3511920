"""Executors: logical operations on a resource, composed of granular steps.

Waldur's vocabulary: ``pre_apply`` runs in the caller's transaction, ``get_task_signature`` returns the
work, ``get_success_signature`` runs once after it, ``get_failure_signature`` once if any step fails for
good. ``execute`` records the operation and sends its first messages after the caller's commit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import dramatiq
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, object_session

from middleware import PlanBuilder, ThrottleScope, end_operation, first_steps
from middleware.outbox import send_first_steps
from middleware.plan import Node, check_json
from middleware.throttle import scopes_of
from resources.after_commit import on_commit
from resources.db import get_sessionmaker, join_session, session_scope
from resources.errors import InvalidArgument, JobsError
from resources.json_columns import EncodedJSON
from resources.models import Operation, OperationStatus, Resource, new_uuid, utcnow
from resources.quick_statements import insert_with_next_statement, quick_insert

from .. import queues
from .inline import run_inline

__all__ = ["BaseExecutor", "ExecutorStage", "OperationHandle", "OperationTimeout"]

Signature = Any  # a dramatiq Message, pipeline, group, list of those, ExecutorStage, or None

_INSERT_OPERATION = insert(Operation.__table__)


class OperationTimeout(JobsError):
    """An operation did not end within the time a caller was willing to wait."""


@dataclass(frozen=True)
class OperationHandle:
    """What ``execute`` returns: the id stored on the resource, and a way to follow the operation."""

    id: str
    resource_ref: str
    executor: str

    def status(self) -> str:
        with session_scope() as session:
            return session.scalars(select(Operation.status).where(Operation.id == self.id)).one()

    def cancel(self, reason: str = "cancelled") -> bool:
        """End the operation now: no further step runs, its failure callbacks run (the resource goes to
        ERRED with ``reason``), and its throttle slot, or its place in line, is released. Returns False
        if it had already ended."""
        return end_operation(dramatiq.get_broker(), self.id, "cancel", reason, status=OperationStatus.CANCELLED)

    def wait(self, timeout: float = 60.0, interval: float = 0.05) -> Operation:
        """Block until the operation has ended; return its row. For scripts and tests."""
        deadline = time.monotonic() + timeout
        while True:
            with session_scope() as session:
                operation = session.get(Operation, self.id)
                if operation is not None and operation.status != OperationStatus.RUNNING:
                    return operation
            if time.monotonic() > deadline:
                raise OperationTimeout(
                    f"operation {self.id} ({self.executor} on {self.resource_ref}) still running after "
                    f"{timeout} s; raise the timeout or check the workers"
                )
            time.sleep(interval)


class OperationBuilder(PlanBuilder):
    """The plan builder, plus the caller's session for the pre_apply of nested executors."""

    def __init__(self, operation_id: str, session: Session, *, queue_name: str | None = None) -> None:
        super().__init__(operation_id, queue_name=queue_name)
        self.session = session


@dataclass(frozen=True)
class ExecutorStage:
    """An executor used as a stage of another executor's work (e.g. delete each volume of an instance)."""

    executor: type[BaseExecutor]
    instance: Resource
    kwargs: dict[str, Any]

    def build_node(self, builder: PlanBuilder) -> Node | None:
        if not isinstance(builder, OperationBuilder):
            raise TypeError("an executor stage can only be built inside an executor's execute()")
        return self.executor._build(builder, self.instance, self.kwargs)


class BaseExecutor:
    """Subclass and override the ``get_*_signature`` methods (and ``pre_apply``)."""

    #: Human-readable name used in operation records and logs; defaults to the class name.
    name: ClassVar[str | None] = None
    #: The keyword options ``execute()`` accepts, added to those of the base classes; anything else is
    #: refused before anything is written (a misspelt option would otherwise be silently ignored).
    options: ClassVar[frozenset[str]] = frozenset()
    #: The options a caller must pass.
    required_options: ClassVar[frozenset[str]] = frozenset()

    # -- what subclasses override ------------------------------------------------------------------
    @classmethod
    def pre_apply(cls, instance: Resource, *, session: Session, operation_id: str, **kwargs: Any) -> None:
        """Runs in the caller's transaction before anything is queued; raising queues nothing."""

    @classmethod
    def get_task_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        raise NotImplementedError(f"{cls.__name__} must define get_task_signature")

    @classmethod
    def get_success_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return None

    @classmethod
    def get_failure_signature(cls, instance: Resource, serialized_instance: str, **kwargs: Any) -> Signature:
        return None

    @classmethod
    def throttle_scopes(cls, instance: Resource, **kwargs: Any) -> Sequence[ThrottleScope]:
        """Scopes the operation holds a slot in from its first step to its end; none by default."""
        return ()

    # -- composition -----------------------------------------------------------------------------
    @classmethod
    def executor_name(cls) -> str:
        return cls.name or cls.__name__

    @classmethod
    def stage(cls, instance: Resource, **kwargs: Any) -> ExecutorStage:
        """This executor's whole work (with its pre_apply and callbacks) as a stage of another's."""
        return ExecutorStage(cls, instance, kwargs)

    @classmethod
    def accepted_options(cls) -> frozenset[str]:
        accepted: set[str] = set()
        for klass in cls.__mro__:
            accepted |= vars(klass).get("options", frozenset()) | vars(klass).get("required_options", frozenset())
        return frozenset(accepted)

    @classmethod
    def check_options(cls, kwargs: dict[str, Any]) -> None:
        """Refuse unknown or missing options, naming them and the ones this executor takes."""
        try:
            json.dumps(kwargs, allow_nan=False)  # all at once; one by one only to name the one at fault
        except (TypeError, ValueError):
            for name, value in kwargs.items():
                check_json(value, f"option {name!r} of {cls.executor_name()}.execute()")
        accepted = cls.accepted_options()
        unknown = sorted(set(kwargs) - accepted)
        missing = sorted(set().union(*(vars(k).get("required_options", ()) for k in cls.__mro__)) - set(kwargs))
        if not unknown and not missing:
            return
        takes = ", ".join(sorted(accepted)) or "no options"
        problem = f"unknown option(s) {', '.join(map(repr, unknown))}" if unknown else f"missing option(s) {missing}"
        raise InvalidArgument(
            f"{cls.executor_name()}.execute() got {problem}; it takes: {takes}. Check the spelling, or declare "
            f"a new option in {cls.__name__}.options"
        )

    @classmethod
    def _build(cls, builder: OperationBuilder, instance: Resource, kwargs: dict[str, Any]) -> Node | None:
        cls.check_options(kwargs)
        party = builder.add_party(instance.ref, cls.executor_name())
        builder.add_throttle((scope.key, scope.limit) for scope in cls.throttle_scopes(instance, **kwargs))
        cls.pre_apply(instance, session=builder.session, operation_id=builder.operation_id, **kwargs)
        serialized = instance.ref
        work = [
            cls.get_task_signature(instance, serialized, **kwargs),
            cls.get_success_signature(instance, serialized, **kwargs),
        ]
        builder.set_failure(party, cls.get_failure_signature(instance, serialized, **kwargs))
        node = builder.node_for_party(party, work)
        if node is not None:
            node.setdefault("parties", []).append(party)
        return node

    # -- running ---------------------------------------------------------------------------------
    @classmethod
    def execute(
        cls,
        instance: Resource,
        is_async: bool = True,
        countdown: float | None = None,
        is_heavy_task: bool = False,
        **kwargs: Any,
    ) -> OperationHandle:
        """Start the operation on ``instance``.

        Inside a session (the instance is attached to one), ``pre_apply`` and the operation record join
        the caller's transaction and messages are sent only after it commits; nothing is sent on
        rollback. A detached instance gets a transaction of its own, committed (and sent) at once. On
        PostgreSQL the operation's record goes to the server with the transaction's next statement, usually
        its commit, so a failure to write it (the server out of disk, say) is raised there.
        ``countdown`` (seconds) delays the first messages; ``is_heavy_task`` sends every message of the
        operation to the heavy queue. ``is_async=False`` runs the steps here and now, inside the caller's
        transaction (so they see its changes, and it decides whether their results are kept), and
        re-raises a failed step's error after the failure callbacks ran.
        """
        session = object_session(instance)
        own_session = session is None
        if own_session:
            session = get_sessionmaker()()
        assert session is not None
        try:
            if own_session:
                # Inside the try: a refusal here still closes the session, whose transaction (on SQLite, the
                # write lock) would otherwise stay open for as long as the error's traceback is kept.
                instance = _reload(session, instance)
            operation_id = new_uuid()
            # A savepoint: an error in pre_apply or in building the work undoes pre_apply's changes too,
            # so the caller's transaction is left as it was, whatever the caller then does.
            with session.begin_nested():
                builder = OperationBuilder(operation_id, session, queue_name=queues.HEAVY if is_heavy_task else None)
                plan = builder.finish(cls._build(builder, instance, kwargs))
                finished = plan["root"] is None
                # A statement rather than an object: the unit of work's bookkeeping for one row costs more
                # than the insert, and nothing here reads the operation back as an object.
                now = utcnow()
                countdown_ms = int(countdown * 1000) if countdown else None
                outgoing = first_steps(plan, countdown_ms if is_async else None)
                scopes = scopes_of(plan)
                # Marked as not yet sent, with the state change: sent after the commit, and by the relay (rebuilt
                # from the plan) if this process dies in between or the broker is down (see middleware.outbox).
                marked = is_async and bool(outgoing)
                # Every column given: on PostgreSQL the insert then goes with the transaction's next statement, which
                # would not apply the models' Python defaults.
                operation_row = {
                    "id": operation_id,
                    "executor": cls.executor_name(),
                    "resource_ref": instance.ref,
                    "plan": EncodedJSON(builder.encoded),  # the plan's text as finish() checked it: not encoded again
                    "status": OperationStatus.SUCCEEDED if finished else OperationStatus.RUNNING,
                    "failed_step": "",
                    "error_message": "",
                    "error_traceback": "",
                    "created_at": now,
                    "finished_at": now if finished else None,
                    "first_steps_since": now if marked else None,
                    "first_steps_delay_ms": countdown_ms if marked else None,
                }
                if not is_async:
                    session.execute(_INSERT_OPERATION, operation_row)  # the steps run here, in this transaction
                elif not insert_with_next_statement(session, _INSERT_OPERATION, operation_row):
                    quick_insert(session, _INSERT_OPERATION, operation_row)
            if marked:
                on_commit(
                    session,
                    lambda: send_first_steps(dramatiq.get_broker(), operation_id, outgoing, throttle_scopes=scopes),
                )
            elif not is_async:
                _run_in_transaction(session, operation_id, outgoing, commit_on_failure=own_session)
            if own_session:
                session.commit()
        finally:
            if own_session:
                session.close()
        return OperationHandle(operation_id, instance.ref, cls.executor_name())


def _run_in_transaction(session: Session, operation_id: str, outgoing: list, *, commit_on_failure: bool) -> None:
    try:
        with join_session(session):
            run_inline(dramatiq.get_broker(), operation_id, outgoing)
    except Exception:
        if commit_on_failure:
            session.commit()  # our own transaction: keep the error and ERRED state, as a worker would
        raise


def _reload(session: Session, instance: Resource) -> Resource:
    model = type(instance)
    loaded = session.scalars(select(model).where(model.uuid == instance.uuid)).one_or_none()
    if loaded is None:
        raise JobsError(
            f"{model.__name__} {instance.uuid} is not in the database; add it to a session and commit "
            "(or flush and pass the attached object) before executing an operation on it"
        )
    return loaded
