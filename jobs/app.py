"""What worker processes load: ``dramatiq jobs.app --queues default`` (see the Procfile)."""

from resources.logs import install_log_format

from . import actors, broker
from .executors import examples

__all__ = ["actors", "broker", "examples"]

# The dramatiq CLI sets up the root logger's handler before it imports this module: add the step fields
# and JOBS_LOG_FORMAT to it (scheduler.app imports this module too).
install_log_format()
