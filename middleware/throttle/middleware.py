"""The throttle middleware: at most N operations at once per scope, each holding its slot from its first
step to its end, across every worker process.

The producer admits or parks an operation when it sends the first steps (:meth:`Throttle.submit`); the
worker checks the operation still holds before every step (:meth:`before_step`: a step whose operation
lost its slot re-acquires first) and releases at the terminal state, handing the slot to the next waiter
in the same script (:meth:`release`); once a step is over, its operation's lease stops expiring until the next
one starts (:meth:`after_step`). ``OperationTransitions`` calls these at the right moments: only it knows when
a step is a duplicate or an operation has ended.

A heartbeat thread per worker process renews the leases of operations whose steps run here (a busy step
thread cannot starve it) and reaps expired ones: a killed worker's slots are reclaimed, a hand-off whose
message was lost in a crash is sent again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.middleware import Middleware, SkipMessage

from resources.config import Settings, get_settings
from resources.metrics import handoff_started
from resources.redis_client import ScriptCall, get_redis

from ..heartbeat import Heartbeat
from ..plan import OPTION_OPERATION, OPTION_THROTTLE
from ..progress import Outgoing, deferring, enqueue_all
from ..transient import Unavailable
from .scopes import ThrottleScope
from .store import Admission, Guard, GuardedCall, Handoff, ThrottleStore

__all__ = ["Throttle", "ThrottleUnavailable", "find_throttle", "scopes_of"]

logger = logging.getLogger(__name__)

#: On the first message of a hand-off: the grant's fence. Its step's start measures the hand-off latency.
OPTION_HANDOFF = "throttle_handoff"


class ThrottleUnavailable(Unavailable):
    """The throttle could not be asked (Redis unreachable). The step does not run unthrottled: it is
    retried later, like any step that met a transient error."""


def scopes_of(options: dict[str, Any]) -> list[ThrottleScope]:
    return [ThrottleScope(key, int(limit)) for key, limit in options.get(OPTION_THROTTLE) or ()]


def find_throttle(broker: dramatiq.Broker) -> Throttle | None:
    return next((m for m in broker.middleware if isinstance(m, Throttle)), None)


def _encoded(message: Message[Any]) -> str:
    return message.encode().decode()


class Throttle(Middleware):
    def __init__(self, settings: Settings | None = None, *, store: ThrottleStore | None = None) -> None:
        settings = settings or get_settings()
        self.enabled = settings.throttle_enabled
        self.heartbeat_s = settings.throttle_heartbeat_s
        self._settings = settings
        self._store = store
        self._lock = threading.Lock()
        #: Steps running in this process, per operation: the leases the heartbeat renews.
        self._running: Counter[str] = Counter()
        self._heartbeat: Heartbeat | None = None

    @property
    def store(self) -> ThrottleStore:
        if self._store is None:  # lazily: the CLI may start an embedded Redis after import
            settings = self._settings
            self._store = ThrottleStore(
                get_redis(settings.redis_url),
                f"{settings.namespace}:throttle",
                lease_ms=int(settings.throttle_lease_s * 1000),
                handoff_timeout_ms=int(settings.throttle_handoff_timeout_s * 1000),
            )
        return self._store

    # -- producer side ---------------------------------------------------------------------------
    def submit(
        self, broker: dramatiq.Broker, operation_id: str, scopes: list[ThrottleScope], outgoing: list[Outgoing]
    ) -> str:
        """Send the operation's first steps if it is admitted; otherwise park them until its turn.
        Returns the admission status."""
        if not self.enabled or not scopes or not outgoing:
            enqueue_all(broker, outgoing)  # nothing to throttle: no steps (an operation with nothing to do)
            return "granted"
        admission = self.admit(broker, operation_id, scopes, outgoing, send=True)
        if admission.status == "granted" and not admission.sent:
            enqueue_all(broker, outgoing)
        return admission.status

    def admit(
        self,
        broker: dramatiq.Broker,
        operation_id: str,
        scopes: list[ThrottleScope],
        outgoing: list[Outgoing],
        *,
        guard: Guard | None = None,
        send: bool = False,
    ) -> Admission:
        """``submit`` without the send of a granted operation's first steps, which the caller makes unless the
        admission says ``sent``. From the admission on, the throttle keeps those steps: it sends them when a
        parked operation's turn comes, and sends a granted operation's again when none of them has started
        within the hand-off timeout. ``guard``: see ``ThrottleStore.acquire``.

        ``send``: on a broker that can defer its enqueues to this Redis server (the project's Redis broker),
        send a granted operation's first steps in the round trip of its admission (``sent``). The broker's
        enqueue hooks run before the admission; a parked operation's steps are then not stored."""
        deferred: Sequence[GuardedCall] = ()
        defer = deferring(broker, self.store.client) if send else None
        if defer is not None:
            with defer() as deferred:
                enqueue_all(broker, outgoing)
        admission = self.store.acquire(
            operation_id,
            scopes,
            start=False,
            messages=[(item.delay or 0, _encoded(item.message)) for item in outgoing],
            guard=guard,
            then=deferred,
        )
        if defer is not None and admission.status == "granted":
            # Every message went through the broker's enqueue above; its stores, if any, ran with the grant.
            admission = dataclasses.replace(admission, sent=True)
        return self._admitted(broker, operation_id, scopes, admission)

    def admit_ahead(
        self,
        broker: dramatiq.Broker,
        operation_id: str,
        scopes: list[ThrottleScope],
        outgoing: list[Outgoing],
        *,
        guard: Guard,
        answer: Callable[[Admission | Exception], None],
    ) -> bool:
        """``admit(…, guard=guard, send=True)`` without waiting for Redis's answer, which ``answer`` gets once it
        is read (``ThrottleStore.acquire_ahead``): the admission, a granted operation's first steps with it, or the
        error that kept it from being made. Returns False, having done nothing, where the first steps cannot go
        in the admission's round trip (another broker or server): ``admit`` then. A failed send raises here."""
        defer = deferring(broker, self.store.client)
        if defer is None:
            return False
        with defer() as deferred:
            enqueue_all(broker, outgoing)

        def admitted(admission: Admission | Exception) -> None:
            if not isinstance(admission, Exception):
                admission = self._admitted(broker, operation_id, scopes, admission)
            answer(admission)

        self.store.acquire_ahead(
            operation_id,
            scopes,
            messages=[(item.delay or 0, _encoded(item.message)) for item in outgoing],
            guard=guard,
            then=deferred,
            answer=admitted,
        )
        return True

    def _admitted(
        self, broker: dramatiq.Broker, operation_id: str, scopes: Sequence[ThrottleScope], admission: Admission
    ) -> Admission:
        """What every admission is followed by: the hand-offs it made sent, a parked operation logged."""
        self.send(broker, admission.handoffs)
        if admission.status == "parked":
            logger.info("operation %s waits for a slot in %s", operation_id, ", ".join(s.key for s in scopes))
        return admission

    # -- worker side -----------------------------------------------------------------------------
    def before_step(self, broker: dramatiq.Broker, message: Message[Any]) -> int | None:
        """Admit this step of its operation; park it (SkipMessage) when the operation must wait.
        Returns the operation's grant number, or None when it is not throttled. Its caller calls ``after_step``
        once the step is over (``OperationTransitions`` does both)."""
        scopes = scopes_of(message.options)
        if not self.enabled or not scopes:
            return None
        operation_id = message.options[OPTION_OPERATION]
        try:
            admission = self.store.acquire(
                operation_id, scopes, start=True, messages=[(0, _encoded(message))], limits_are_current=False
            )
        except Exception as error:
            raise ThrottleUnavailable(f"throttle check of operation {operation_id} failed: {error}") from error
        self.send(broker, admission.handoffs)
        if admission.status == "done":
            raise SkipMessage(f"operation {operation_id} has already released its throttle slot")
        if admission.status == "parked":
            logger.info("operation %s lost its slot or waits for one; step parked", operation_id)
            raise SkipMessage(f"operation {operation_id} waits for a throttle slot")
        if message.options.get(OPTION_HANDOFF) == admission.fence:  # not a later grant's redelivery
            handoff_started(lambda: self.store.handoff_latency_ms(operation_id))
        with self._lock:
            self._running[operation_id] += 1
        return admission.fence

    def after_step(self, message: Message[Any]) -> ScriptCall | None:
        """The step that ``before_step`` admitted is over, whatever its outcome. Once no step of its operation
        runs here, the operation's lease must stop expiring (its next step, its retry or its redelivery is safe in
        the broker): returns the call that says so, which the caller makes (``run_calls``) before it records the
        step's outcome, or in the round trip of that record when it is a mark in Redis. None: nothing to do.

        Before the record: a worker killed while recording or sending leaves the operation holding its slot
        until the broker delivers the step again, instead of handing the slot to another operation while this
        one is still between two steps.
        """
        if not self.enabled or not message.options.get(OPTION_THROTTLE) or OPTION_OPERATION not in message.options:
            return None
        operation_id = message.options[OPTION_OPERATION]
        with self._lock:
            if operation_id not in self._running:
                return None  # not admitted here (a callback, a chained step, or parked)
            self._running[operation_id] -= 1
            if self._running[operation_id] > 0:
                return None
            del self._running[operation_id]
        return self.store.queued_call([operation_id])

    def release(self, broker: dramatiq.Broker, operation_id: str, *, delete_keys: Sequence[str] = ()) -> None:
        """End the operation's hold and send the next waiters' first steps. Idempotent. ``delete_keys`` go
        in the same round trip (see ``ThrottleStore.release``); only while the throttle is enabled."""
        if self.enabled:
            self.send(broker, self.store.release(operation_id, delete_keys=delete_keys))

    def send(self, broker: dramatiq.Broker, handoffs: Iterable[Handoff]) -> None:
        for handoff in handoffs:
            for index, (delay, encoded) in enumerate(handoff.messages):
                message = Message.decode(encoded.encode())
                if index == 0:
                    message = message.copy(options={OPTION_HANDOFF: handoff.fence})
                broker.enqueue(message, delay=delay or None)

    def running_operations(self) -> list[str]:
        with self._lock:
            return list(self._running)

    # -- the heartbeat ---------------------------------------------------------------------------
    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self.enabled:
            self._heartbeat = Heartbeat("throttle-heartbeat", self.heartbeat_s, lambda: self.beat(broker))
            self._heartbeat.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def beat(self, broker: dramatiq.Broker) -> None:
        """One heartbeat: renew this process's leases, reap expired ones everywhere."""
        lost = self.store.renew(self.running_operations())
        for operation_id in lost:
            logger.warning("operation %s lost its throttle slot while a step ran here", operation_id)
        redrives, handoffs = self.store.reap()
        for handoff in redrives:
            logger.warning(
                "re-sending the hand-off to operation %s (its first step never started)", handoff.operation_id
            )
        self.send(broker, [*redrives, *handoffs])
