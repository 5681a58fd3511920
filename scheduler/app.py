"""What the scheduler and the background workers load (see the Procfile):

periodiq scheduler.app                            # sends each periodic job when it is due
dramatiq scheduler.app --queues background        # runs them
"""

from jobs import app as jobs_app

from . import periodic

__all__ = ["jobs_app", "periodic"]
