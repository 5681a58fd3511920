"""A daemon thread that calls a function every few seconds while a worker process lives.

The throttle renews operation leases with it and the de-duplication guard renews the guards of
running jobs: a lease that outlives its process is exactly what these beats prevent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Heartbeat"]

logger = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, name: str, interval_s: float, beat: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval_s = interval_s
        self.beat = beat
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.beat()
            except Exception:
                logger.exception("%s failed; trying again in %s s", self.name, self.interval_s)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
