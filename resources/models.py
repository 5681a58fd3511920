"""SQLAlchemy 2 typed models: the scope (ServiceSettings), the resource base, the example resources,
and the operations that executors run on them."""

from __future__ import annotations

import uuid as uuid_module
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from sqlalchemy import JSON, Enum, ForeignKey, Index, Integer, String, Text, func, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column, relationship, validates

from .errors import UnknownResourceType
from .limits import validate_limit
from .states import State

__all__ = [
    "Base",
    "Instance",
    "Operation",
    "OperationStatus",
    "OutboxMessage",
    "Resource",
    "ServiceSettings",
    "StepDone",
    "Volume",
    "model_for_type",
    "new_uuid",
    "resource_types",
    "utcnow",
]


def new_uuid() -> str:
    return uuid_module.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class ServiceSettings(Base):
    """A cloud account or tenant: the scope operations are throttled in."""

    __tablename__ = "service_settings"

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(32), unique=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(150))
    #: Name of the backend implementation (see resources.backends).
    backend: Mapped[str] = mapped_column(String(50), default="simulated")
    #: Free-form options, e.g. {"max_concurrent_provision_instance": 4}.
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)

    @validates("options")
    def _check_limits(self, _key: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
        # A bad limit is refused when it is configured, not found by a worker mid-run.
        for name, value in (options or {}).items():
            if name.startswith("max_concurrent_"):
                validate_limit(value, what=f"option {name} of service settings {self.name!r}")
        return options


_RESOURCE_TYPES: dict[str, type[Resource]] = {}


class Resource(Base):
    """What every cloud resource has: identity, state, backend link, error and current operation."""

    __abstract__ = True
    #: The name used in resource references ("instance:<uuid>"); set by each concrete model.
    resource_type: ClassVar[str]

    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(32), unique=True, index=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(150))
    state: Mapped[State] = mapped_column(
        Enum(State, native_enum=False, length=32, validate_strings=True),
        default=State.CREATION_SCHEDULED,
        index=True,
    )
    runtime_state: Mapped[str] = mapped_column(String(150), default="")
    backend_id: Mapped[str] = mapped_column(String(255), default="")
    error_message: Mapped[str] = mapped_column(Text, default="")
    error_traceback: Mapped[str] = mapped_column(Text, default="")
    action: Mapped[str] = mapped_column(String(50), default="")
    action_details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: Id of the operation that last scheduled or ran work on this resource.
    operation_id: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    modified_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @declared_attr
    def service_settings_id(cls) -> Mapped[int]:
        return mapped_column(ForeignKey("service_settings.id"), index=True)

    @declared_attr
    def service_settings(cls) -> Mapped[ServiceSettings]:
        return relationship(ServiceSettings, lazy="joined", innerjoin=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "resource_type" in cls.__dict__:
            _RESOURCE_TYPES[cls.resource_type] = cls

    @property
    def ref(self) -> str:
        """The reference used in messages: ``type:uuid``, never the object itself."""
        return f"{self.resource_type}:{self.uuid}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uuid[:8]} {self.name!r} {self.state}>"

    def snapshot(self) -> Self:
        """A copy of the columns and the service settings, attached to no session: what a backend gets.

        Backends run for minutes with no database session open; a copy (rather than expunging this
        object) leaves the caller's session and objects untouched.
        """
        values = {attr.key: getattr(self, attr.key) for attr in inspect(type(self)).column_attrs}
        copy = type(self)(**values)
        settings = self.service_settings
        copy.service_settings = ServiceSettings(
            id=settings.id,
            uuid=settings.uuid,
            name=settings.name,
            backend=settings.backend,
            options=dict(settings.options),
        )
        return copy


class Instance(Resource):
    """A virtual machine."""

    __tablename__ = "instances"
    resource_type = "instance"

    flavor: Mapped[str] = mapped_column(String(50), default="small")
    volumes: Mapped[list[Volume]] = relationship(back_populates="instance", order_by="Volume.id")


class Volume(Resource):
    """A block-storage volume, optionally attached to an instance."""

    __tablename__ = "volumes"
    resource_type = "volume"

    size_gb: Mapped[int] = mapped_column(Integer, default=10)
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True, default=None)
    instance: Mapped[Instance | None] = relationship(back_populates="volumes")


def model_for_type(resource_type: str) -> type[Resource]:
    try:
        return _RESOURCE_TYPES[resource_type]
    except KeyError:
        known = ", ".join(sorted(_RESOURCE_TYPES))
        raise UnknownResourceType(f"resource type {resource_type!r} is not registered; known types: {known}") from None


def resource_types() -> dict[str, type[Resource]]:
    return dict(_RESOURCE_TYPES)


class OperationStatus:
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Operation(Base):
    """One logical operation run by an executor: its plan of steps and its outcome."""

    __tablename__ = "operations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    executor: Mapped[str] = mapped_column(String(200))
    resource_ref: Mapped[str] = mapped_column(String(100), index=True)
    status: Mapped[str] = mapped_column(String(20), default=OperationStatus.RUNNING)
    #: The composed work (see middleware.plan): the tree of steps and the parties to call back.
    plan: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: The step that failed for good, its error and traceback.
    failed_step: Mapped[str] = mapped_column(String(200), default="")
    error_message: Mapped[str] = mapped_column(Text, default="")
    error_traceback: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Indexed for the retention job, which deletes ended operations by the age of their end.
    finished_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    #: Set while the operation's first steps are not known to be in the broker: ``execute()`` commits it with the
    #: row, and the outbox relay sends the first steps again (rebuilt from the plan) once it is older than the grace
    #: period and their claim is not marked sent. The operation's end, or the relay, clears it.
    first_steps_since: Mapped[datetime | None] = mapped_column(default=None)
    #: The first steps' countdown (``execute(countdown=...)``), in ms, for the relay's rebuild.
    first_steps_delay_ms: Mapped[int | None] = mapped_column(default=None)

    __table_args__ = (
        # The status first, for every query by status; the mark second, for the relay, which looks for running
        # operations marked before its cutoff. One index, not two: the record that ends an operation rewrites
        # this entry anyway (its status changes), and clears the mark in the same write.
        Index("ix_operations_status_first_steps", "status", "first_steps_since"),
    )


class StepDone(Base):
    """A node of an operation's plan that has completed; the primary key makes completion exactly-once."""

    __tablename__ = "operation_steps_done"

    operation_id: Mapped[str] = mapped_column(ForeignKey("operations.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(200), primary_key=True)
    done_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutboxMessage(Base):
    """Messages written in the same transaction as the state change that orders them, deleted once they
    are in the broker (the transactional outbox). A row that outlives its grace period was left by a
    process that died after its commit, or could not reach the broker; a worker's relay sends it."""

    __tablename__ = "outbox"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    operation_id: Mapped[str] = mapped_column(String(32), index=True)
    #: [{"message": <Dramatiq message as a dict>, "delay": <ms or null>}, ...]
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    #: An operation's first steps go through the throttle of these scopes ([[scope, limit], ...]).
    throttle_scopes: Mapped[list[list[Any]] | None] = mapped_column(JSON, default=None)
    #: The operation has ended: release its throttle slot (and hand it to the next waiter) with this send.
    release_throttle: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
