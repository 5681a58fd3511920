"""Dramatiq middleware and the operation plan they run. Imports only ``resources``."""

from .context import StepContext, current_step, step_context
from .dedup import Deduplicate, DuplicateJob, find_deduplicate
from .inflight import Copy, InFlight, find_inflight
from .log_context import LogContext
from .outbox import OutboxRelay
from .periodic import OPTION_TICK, PeriodicTicks
from .plan import Composable, PlanBuilder
from .progress import Outgoing, Progress, complete_step, fail_operation, first_steps
from .step_marks import StepMarks
from .throttle import Throttle, ThrottleScope, find_throttle
from .transitions import OperationTransitions, end_operation, enqueue_all, forget_marks

__all__ = [
    "OPTION_TICK",
    "Composable",
    "Copy",
    "Deduplicate",
    "DuplicateJob",
    "InFlight",
    "LogContext",
    "OperationTransitions",
    "OutboxRelay",
    "Outgoing",
    "PeriodicTicks",
    "PlanBuilder",
    "Progress",
    "StepContext",
    "StepMarks",
    "Throttle",
    "ThrottleScope",
    "complete_step",
    "current_step",
    "end_operation",
    "enqueue_all",
    "fail_operation",
    "find_deduplicate",
    "find_inflight",
    "find_throttle",
    "first_steps",
    "forget_marks",
    "step_context",
]
