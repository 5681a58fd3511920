"""What the scheduler and the background workers load (see the Procfile):

python -m scheduler run                           # sends each periodic job when it is due (one leader)
dramatiq scheduler.app --queues background        # runs them
"""

from jobs import app as jobs_app

from . import janitor, pull, retention

__all__ = ["janitor", "jobs_app", "pull", "retention"]
