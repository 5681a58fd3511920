"""Dramatiq middleware and the operation plan they run. Imports only ``resources``."""

from .context import StepContext, current_step, step_context
from .plan import Composable, PlanBuilder
from .progress import Outgoing, complete_step, fail_operation, first_steps
from .transitions import OperationTransitions, enqueue_all

__all__ = [
    "Composable",
    "OperationTransitions",
    "Outgoing",
    "PlanBuilder",
    "StepContext",
    "complete_step",
    "current_step",
    "enqueue_all",
    "fail_operation",
    "first_steps",
    "step_context",
]
