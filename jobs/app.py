"""What worker processes load: ``dramatiq jobs.app --queues default`` (see the Procfile)."""

from . import actors, broker
from .executors import examples

__all__ = ["actors", "broker", "examples"]
