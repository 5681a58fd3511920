"""Dramatiq middleware and the operation plan they run. Imports only ``resources``."""

from .context import StepContext, current_step, step_context
from .plan import Composable, PlanBuilder
from .progress import Outgoing, Progress, complete_step, fail_operation, first_steps
from .throttle import Throttle, ThrottleScope, find_throttle, send_first_steps
from .transitions import OperationTransitions, enqueue_all

__all__ = [
    "Composable",
    "OperationTransitions",
    "Outgoing",
    "PlanBuilder",
    "Progress",
    "StepContext",
    "Throttle",
    "ThrottleScope",
    "complete_step",
    "current_step",
    "enqueue_all",
    "fail_operation",
    "find_throttle",
    "first_steps",
    "send_first_steps",
    "step_context",
]
