"""Models, the state machine, sessions, after-commit sending and backends. Imports nothing of the
project's other packages."""

from .after_commit import on_commit
from .config import Settings, get_settings
from .db import create_schema, get_engine, get_sessionmaker, session_scope
from .errors import (
    BackendError,
    BackendNotFound,
    ConfigurationError,
    JobsError,
    ResourceNotFound,
    TransitionNotAllowed,
    UnknownResourceType,
)
from .models import Base, Instance, Operation, OperationStatus, Resource, ServiceSettings, Volume
from .refs import parse_ref
from .states import TRANSITIONAL_STATES, State
from .transitions import apply_transition, claim_for_operation, load_resource

__all__ = [
    "TRANSITIONAL_STATES",
    "BackendError",
    "BackendNotFound",
    "Base",
    "ConfigurationError",
    "Instance",
    "JobsError",
    "Operation",
    "OperationStatus",
    "Resource",
    "ResourceNotFound",
    "ServiceSettings",
    "Settings",
    "State",
    "TransitionNotAllowed",
    "UnknownResourceType",
    "Volume",
    "apply_transition",
    "claim_for_operation",
    "create_schema",
    "get_engine",
    "get_sessionmaker",
    "get_settings",
    "load_resource",
    "on_commit",
    "parse_ref",
    "session_scope",
]
