"""Prometheus exposition of worker processes: Dramatiq's own metrics and ours on one endpoint.

Dramatiq's :class:`~dramatiq.middleware.prometheus.Prometheus` middleware puts prometheus_client in
multiprocess mode at each worker process's boot (``PROMETHEUS_MULTIPROC_DIR`` = ``dramatiq_prom_db``):
every process writes its counters and histograms to files of its own there, ours
(``resources.metrics``) included. Its fork hook starts one extra process per ``dramatiq`` command that
serves those files over HTTP (``dramatiq_prom_host``:``dramatiq_prom_port``, default 0.0.0.0:9191).
:class:`JobsPrometheus` swaps that server for :func:`serve_metrics`, whose registry has one more
collector: :class:`JobsCollector`, the gauges of shared state (throttle holders and waiters, outbox
backlog, running operations) read from Redis and the database at scrape time, so that no process
keeps a stale copy of them.

prometheus_client is imported inside functions only: the worker imports this module before its boot,
and importing prometheus_client then would fix single-process mode for Dramatiq's metrics and ours.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import timedelta
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING

import dramatiq
from dramatiq.middleware.prometheus import DB_PATH, HTTP_HOST, HTTP_PORT, Prometheus
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from resources.db import read_scope
from resources.metrics import get_metrics
from resources.models import Operation, OperationStatus, OutboxMessage, utcnow

from .throttle import Throttle

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

__all__ = ["JobsCollector", "JobsPrometheus", "exposition_registry", "serve_metrics"]

logger = logging.getLogger(__name__)


class JobsCollector:
    """Gauges of state shared by every process, read when Prometheus scrapes. A source that cannot be
    read leaves its gauges out and sets ``jobs_metrics_source_up{source}`` to 0; the scrape still works."""

    def __init__(
        self,
        throttle: Throttle | None = None,
        sessions: Callable[[], AbstractContextManager[Session]] = read_scope,
    ) -> None:
        self._throttle = throttle
        self.sessions = sessions

    @property
    def throttle(self) -> Throttle:
        if self._throttle is None:  # lazily: settings are read when the server starts, not at import
            self._throttle = Throttle()
        return self._throttle

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only: registering the collector must not query Redis or the database.
        yield from self._families().values()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        up = families["up"]
        if self.throttle.enabled:
            up.add_metric(["redis"], self._read(lambda: self._throttle_gauges(families)))
        up.add_metric(["database"], self._read(lambda: self._database_gauges(families)))
        yield from families.values()

    @staticmethod
    def _read(read: Callable[[], None]) -> float:
        try:
            read()
            return 1.0
        except Exception as error:
            logger.warning("metrics: a source could not be read (%s: %s)", type(error).__name__, error)
            return 0.0

    def _throttle_gauges(self, families: dict[str, GaugeMetricFamily]) -> None:
        occupancy = self.throttle.store.occupancy()
        for scope, (limit, holders, waiters) in occupancy.items():
            families["holders"].add_metric([scope], holders)
            families["waiters"].add_metric([scope], waiters)
            if limit is not None:
                families["limit"].add_metric([scope], limit)

    def _database_gauges(self, families: dict[str, GaugeMetricFamily]) -> None:
        with self.sessions() as session:
            backlog, oldest = session.execute(select(func.count(), func.min(OutboxMessage.created_at))).one()
            marked, oldest_marked = session.execute(
                select(func.count(), func.min(Operation.first_steps_since)).where(
                    Operation.status == OperationStatus.RUNNING, Operation.first_steps_since.is_not(None)
                )
            ).one()
            backlog += marked
            oldest = min((t for t in (oldest, oldest_marked) if t is not None), default=None)
            running = session.execute(
                select(Operation.executor, func.count())
                .where(Operation.status == OperationStatus.RUNNING)
                .group_by(Operation.executor)
            ).all()
        families["outbox_backlog"].add_metric([], backlog)
        age = (utcnow() - oldest) if oldest is not None else timedelta(0)
        families["outbox_oldest"].add_metric([], max(age.total_seconds(), 0.0))
        for executor, count in running:
            families["running"].add_metric([executor], count)

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        scope = ["scope"]
        return {
            "holders": GaugeMetricFamily(
                "jobs_throttle_holders", "Operations holding a slot of the throttle scope.", labels=scope
            ),
            "waiters": GaugeMetricFamily(
                "jobs_throttle_waiters", "Operations waiting in line for a slot of the throttle scope.", labels=scope
            ),
            "limit": GaugeMetricFamily(
                "jobs_throttle_limit", "The most operations that may hold the throttle scope at once.", labels=scope
            ),
            "outbox_backlog": GaugeMetricFamily(
                "jobs_outbox_backlog",
                "Outbox rows, and operations' first steps, committed but not yet known to be in the broker.",
            ),
            "outbox_oldest": GaugeMetricFamily(
                "jobs_outbox_oldest_age_seconds",
                "Age of the oldest outbox row or first steps not yet known sent (0 when there is none).",
            ),
            "running": GaugeMetricFamily(
                "jobs_operations_running", "Operations under way, by executor.", labels=["executor"]
            ),
            "up": GaugeMetricFamily(
                "jobs_metrics_source_up",
                "1 if the scrape could read the source (redis, database) of the gauges above, else 0.",
                labels=["source"],
            ),
        }


class JobsPrometheus(Prometheus):
    """Dramatiq's Prometheus middleware, its exposition server replaced by :func:`serve_metrics`.

    Place it before every middleware that may skip a message: Dramatiq calls every ``after_skip_message``
    hook, and the in-progress gauge of a message whose start it did not see would go negative."""

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_metrics]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        super().after_process_boot(broker)
        from prometheus_client import values

        if not getattr(values.ValueClass, "_multiprocess", False):
            logger.error(
                "metrics: prometheus_client was imported before the worker's boot, so this process's metrics "
                "stay in memory and the endpoint will not show them; import it lazily"
            )
        get_metrics()  # now, so that every metric shows (at zero) from the first scrape


def exposition_registry(path: str = DB_PATH, collector: JobsCollector | None = None) -> CollectorRegistry:
    """What one scrape returns: every process's files in ``path`` (Dramatiq's metrics and ours), and
    the gauges read at scrape time."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    registry.register(collector if collector is not None else JobsCollector())
    return registry


def serve_metrics() -> int:
    """The exposition server; Dramatiq runs it in a process of its own, forked by the ``dramatiq`` command."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = DB_PATH
    from prometheus_client.exposition import MetricsHandler

    handler = MetricsHandler.factory(exposition_registry())
    try:
        # Threads: a scrape waiting on Redis or the database does not hold up the next one.
        server = ThreadingHTTPServer((HTTP_HOST, HTTP_PORT), handler)
    except OSError as error:
        logger.error(
            "metrics: cannot listen on %s:%d (%s); set dramatiq_prom_port to a free port", HTTP_HOST, HTTP_PORT, error
        )
        return 1
    server.daemon_threads = True
    logger.info("metrics: serving http://%s:%d/metrics from %s", HTTP_HOST, HTTP_PORT, DB_PATH)
    with server:
        server.serve_forever()
    return 0
