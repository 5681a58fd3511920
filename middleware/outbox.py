"""The transactional outbox: messages are written in the transaction of the state change that orders
them and sent after it commits, so a commit is never left without its messages.

An operation's first steps need no row of their own: ``execute()`` commits the operation's row marked
``first_steps_since`` (the plan holds every step's message), and ``send_first_steps`` sends them after the
commit. Everything else goes through outbox rows: a failure's callbacks and slot release, and a completed
step's successors only when the broker refused them (see ``transitions``: otherwise a redelivery of the step
covers a crash). ``stage`` adds a row to the caller's transaction, and ``deliver`` sends it under its row lock
and deletes it in the same transaction.

``relay`` sends what a process left behind, killed between its commit and its send, or cut off from the
broker: outbox rows, and the first steps of running operations still marked past the grace period. Every
sender first takes a claim in Redis (``outbox_claims``; an operation's first steps are claimed by the
operation's id), so two senders never both send; a sender killed after its send but before its mark leaves
messages that are sent again, which the steps' idempotency makes harmless. A throttled operation's first steps
are claimed already marked sent, in the throttle's admission script, since the throttle keeps those steps from
then on and sends them again if they never start. The relay clears the mark of operations whose claim says
sent, in batches; an operation's end clears its own mark in the write that ends it, and drops the claim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.middleware import Middleware
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from resources.config import get_settings
from resources.db import read_scope, session_scope
from resources.metrics import outbox_relayed
from resources.models import Operation, OperationStatus, OutboxMessage, new_uuid, utcnow
from resources.quick_statements import quick_insert
from resources.redis_client import ThreadConnections, get_redis

from .claimed_send import ClaimedSend, load_scripts, send_claimed
from .heartbeat import Heartbeat
from .outbox_claims import Claim, claim, claim_states, forget, mark_sent, new_token, release, sent_claim
from .plan import message_fields
from .progress import Outgoing, deferring, enqueue_all, first_steps
from .throttle import Admission, Guard, Throttle, ThrottleScope, find_throttle, scopes_of

__all__ = ["OutboxRelay", "deliver", "pending", "pending_first_steps", "relay", "send_first_steps", "stage"]

logger = logging.getLogger(__name__)

_INSERT_ROW = insert(OutboxMessage.__table__)
#: Rows one relay pass reads at a time.
RELAY_BATCH = 200


def stage(
    session: Session,
    operation_id: str,
    outgoing: Sequence[Outgoing],
    *,
    release_throttle: bool = False,
) -> str | None:
    """Write ``outgoing`` to the outbox in ``session``'s transaction; returns the row id to ``deliver``
    after the commit (None when there is nothing to do). ``release_throttle`` (the operation has ended)
    frees its slot with the send: a crash cannot leave the slot taken."""
    if not outgoing and not release_throttle:
        return None
    row_id = new_uuid()
    row = {
        "id": row_id,
        "operation_id": operation_id,
        "messages": [{"message": message_fields(item.message), "delay": item.delay} for item in outgoing],
        "throttle_scopes": None,
        "release_throttle": release_throttle,
        "created_at": utcnow(),
    }
    # A statement rather than an object: nothing reads the row back in this session, and the unit of work's
    # bookkeeping for one row costs more than the insert.
    quick_insert(session, _INSERT_ROW, row)
    return row_id


def _outgoing(row: OutboxMessage) -> list[Outgoing]:
    return [Outgoing(_message(item["message"]), item["delay"]) for item in row.messages]


def _message(fields: dict[str, Any]) -> Message[Any]:
    return Message(**{**fields, "args": tuple(fields["args"])})


def _send(
    broker: dramatiq.Broker,
    operation_id: str,
    outgoing: Sequence[Outgoing],
    throttle_scopes: Sequence[ThrottleScope],
    release_throttle: bool,
) -> None:
    throttle = find_throttle(broker)
    if release_throttle and throttle is not None:
        throttle.release(broker, operation_id)  # idempotent: a second release changes nothing
    if throttle_scopes and throttle is not None:
        throttle.submit(broker, operation_id, list(throttle_scopes), list(outgoing))
    else:
        enqueue_all(broker, outgoing)


def _send_row(broker: dramatiq.Broker, row: OutboxMessage) -> None:
    scopes = [ThrottleScope(key, int(limit)) for key, limit in row.throttle_scopes or ()]
    _send(broker, row.operation_id, _outgoing(row), scopes, row.release_throttle)


def _not_sent_yet(row_id: str, operation_id: str, error: Exception) -> None:
    logger.warning(
        "outbox row %s (operation %s) not sent yet (%s: %s); the outbox relay sends it once the broker "
        "and the database answer",
        row_id,
        operation_id,
        type(error).__name__,
        error,
    )


def _claim_and_send(name: str, send: Callable[[], None]) -> Claim:
    """Send if this sender gets the claim ``name`` (a row's id, or an operation's for its first steps), then mark
    it sent; a failed send gives the claim up, so that the relay need not wait for it to lapse."""
    token = new_token()
    outcome = claim(name, token)
    if outcome is Claim.TAKEN:
        try:
            send()
        except Exception:
            release(name, token)
            raise
        mark_sent(name)
    return outcome


def send_first_steps(
    broker: dramatiq.Broker,
    operation_id: str,
    outgoing: Sequence[Outgoing],
    *,
    throttle_scopes: Sequence[ThrottleScope] = (),
) -> bool:
    """Send the first steps of operation ``operation_id``, just committed by this process marked as not yet sent,
    without opening a transaction: claim them, send, mark the claim sent (for a throttled operation, see
    ``_admit_and_send``). The mark on the operation's row stays until the operation ends or the relay clears it.
    Returns False when nothing was sent here: the relay had claimed them (this process stalled past the grace
    period), or the send failed, which is logged, not raised, and leaves them to the relay. On the project's Redis
    broker the claim, the send and the mark go in one round trip whose answer is read later (``_send_ahead``,
    ``_admit_and_send``): it returns True once that is sent, and steps the relay had claimed are left to it when
    the answer is read."""
    if not outgoing:
        return False
    throttle = find_throttle(broker)
    if throttle is not None and throttle.enabled and throttle_scopes:
        return _admit_and_send(broker, throttle, operation_id, outgoing, throttle_scopes)

    def send() -> None:
        _send(broker, operation_id, outgoing, throttle_scopes, release_throttle=False)

    sent_ahead = _send_ahead(broker, operation_id, outgoing, send)
    return _send_now(operation_id, send) if sent_ahead is None else sent_ahead


def _not_sent_yet_steps(operation_id: str, error: Exception) -> None:
    logger.warning(
        "the first steps of operation %s are not sent yet (%s: %s); the outbox relay sends them once the broker "
        "and the database answer",
        operation_id,
        type(error).__name__,
        error,
    )


def _send_now(operation_id: str, send: Callable[[], None]) -> bool:
    try:
        return _claim_and_send(operation_id, send) is Claim.TAKEN
    except Exception as error:
        _not_sent_yet_steps(operation_id, error)
        return False


def _send_ahead(
    broker: dramatiq.Broker, operation_id: str, outgoing: Sequence[Outgoing], send: Callable[[], None]
) -> bool | None:
    """``send_first_steps`` for an operation the throttle does not hold, in one round trip not waited for
    (``claimed_send``), where the broker stores its messages on the claims' Redis server: True once sent, False
    when the send failed (logged; the steps are left to the relay, as the usual way leaves them). None, having
    done nothing, elsewhere: the caller sends the usual way."""
    client = get_redis()
    defer = deferring(broker, client)
    if defer is None or not isinstance(client, ThreadConnections):
        return None
    with defer() as stores:
        enqueue_all(broker, outgoing)

    def answered(outcome: ClaimedSend) -> None:
        if outcome is None:  # the server had lost the scripts, and nothing was done: the usual way, then load them
            if _send_now(operation_id, send):
                load_scripts(client)
        elif isinstance(outcome, Exception):
            _not_sent_yet_steps(operation_id, outcome)

    try:
        send_claimed(client, operation_id, new_token(), stores, answered)
    except Exception as error:
        _not_sent_yet_steps(operation_id, error)
        return False
    return True


def _admit_and_send(
    broker: dramatiq.Broker,
    throttle: Throttle,
    operation_id: str,
    outgoing: Sequence[Outgoing],
    scopes: Sequence[ThrottleScope],
) -> bool:
    """``send_first_steps`` for a throttled operation, in one round trip on the project's Redis broker (three
    fewer): the script that admits or parks the operation also takes the steps' claim, marked sent at once, and a
    granted operation's steps are stored in the same round trip. The throttle keeps the steps from then on (it
    sends them when a parked operation's turn comes, and sends a granted operation's again if none has started
    within the hand-off timeout), so they are done even if this process dies before its send. On that broker it
    returns once the round trip is sent, True, its answer read later (``admit_ahead``): steps the relay had
    claimed, or a failure, are then logged as the synchronous send would, not returned."""
    guard = Guard(*sent_claim(operation_id))

    def answered(admission: Admission | Exception) -> None:
        if isinstance(admission, Exception):
            _not_sent_yet_steps(operation_id, admission)

    try:
        # Without waiting for Redis's answer where the steps go with the admission: they are done either way
        # (claimed and sent, or left to the relay), and the answer only says which.
        if throttle.admit_ahead(broker, operation_id, list(scopes), list(outgoing), guard=guard, answer=answered):
            return True
        admission = throttle.admit(broker, operation_id, list(scopes), list(outgoing), guard=guard, send=True)
    except Exception as error:
        _not_sent_yet_steps(operation_id, error)
        return False
    if admission.status == "guarded":
        return False  # another sender (the relay) has them
    if admission.status != "granted" or admission.sent:
        return True  # parked, or ended already (the throttle sends nothing more of it), or sent with the admission
    try:
        enqueue_all(broker, outgoing)
    except Exception as error:
        logger.warning(
            "operation %s was admitted, but its first steps could not be sent (%s: %s); the throttle sends them "
            "again once its hand-off times out",
            operation_id,
            type(error).__name__,
            error,
        )
        return False
    return True


def _deliver(broker: dramatiq.Broker, row_id: str, operation_id: str) -> Claim | None:
    """Send one row under its lock and delete it. What the row's claim came to (``Claim.TAKEN``: sent
    here), or None when the row was gone, locked by another sender, or could not be sent (logged, not
    raised: the transaction that wrote it has committed and must stay committed)."""
    try:
        with session_scope() as session:
            row = session.scalars(
                select(OutboxMessage).where(OutboxMessage.id == row_id).with_for_update(skip_locked=True)
            ).one_or_none()
            if row is None:
                return None  # sent and deleted by another sender, or locked by one right now
            # Marked sent before the delete commits: a sender killed in between leaves a row the next one
            # deletes unsent. The mark stays, for a committing process claiming late.
            outcome = _claim_and_send(row_id, lambda: _send_row(broker, row))
            if outcome is not Claim.BUSY:
                session.delete(row)
    except Exception as error:
        _not_sent_yet(row_id, operation_id, error)
        return None
    if outcome is Claim.SENT:
        forget([row_id])
    return outcome


def deliver(broker: dramatiq.Broker, row_id: str | None, operation_id: str = "?") -> bool:
    """Send one outbox row and delete it. Returns False when nothing was sent here (another sender had
    it) or the send failed; a failed row stays for the relay."""
    return row_id is not None and _deliver(broker, row_id, operation_id) is Claim.TAKEN


def pending(session: Session, *, older_than_s: float = 0.0, limit: int = RELAY_BATCH) -> list[str]:
    """Ids of outbox rows older than ``older_than_s``, oldest first."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(
        session.scalars(
            select(OutboxMessage.id)
            .where(OutboxMessage.created_at <= cutoff)
            .order_by(OutboxMessage.created_at)
            .limit(limit)
        )
    )


_MARKED = select(Operation.id).where(Operation.status == OperationStatus.RUNNING)


def pending_first_steps(session: Session, *, older_than_s: float = 0.0, limit: int = RELAY_BATCH) -> list[str]:
    """Ids of running operations whose first steps have been marked not yet known sent for longer than
    ``older_than_s``, longest first (found through the index on status and the mark)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(
        session.scalars(
            _MARKED.where(Operation.first_steps_since <= cutoff).order_by(Operation.first_steps_since).limit(limit)
        )
    )


def _clear_marks(session: Session, operation_ids: list[str]) -> None:
    """The first steps of these operations are known sent: their rows need not say otherwise any more."""
    session.execute(update(Operation).where(Operation.id.in_(operation_ids)).values(first_steps_since=None))


def _deliver_first_steps(broker: dramatiq.Broker, operation_id: str) -> Claim | None:
    """Send a marked operation's first steps, rebuilt from its plan, under its row lock, and clear its mark. What
    their claim came to (``Claim.TAKEN``: sent here), or None when the operation has ended or is not marked any
    more, or the send failed (logged, not raised)."""
    try:
        with session_scope() as session:
            row = session.execute(
                select(Operation.status, Operation.plan, Operation.first_steps_since, Operation.first_steps_delay_ms)
                .where(Operation.id == operation_id)
                .with_for_update(skip_locked=True)
            ).one_or_none()
            if row is None or row.status != OperationStatus.RUNNING or row.first_steps_since is None:
                return None  # ended, cleared by another sender, or locked by one right now
            outgoing = first_steps(row.plan, row.first_steps_delay_ms)
            scopes = scopes_of(row.plan)
            outcome = _claim_and_send(operation_id, lambda: _send(broker, operation_id, outgoing, scopes, False))
            if outcome is not Claim.BUSY:
                _clear_marks(session, [operation_id])
    except Exception as error:
        _not_sent_yet_steps(operation_id, error)
        return None
    return outcome


def _relay_first_steps(broker: dramatiq.Broker, grace_s: float) -> int:
    """Send the first steps of operations marked past the grace period whose claim is not marked sent (their
    committing process died between its commit and its send, or the broker was down), and clear the marks of
    those whose claim is, in one write per batch. Returns how many operations' first steps were sent."""
    sent = 0
    while True:
        with read_scope() as session:
            ids = pending_first_steps(session, older_than_s=grace_s)
        if not ids:
            break
        try:
            states = claim_states(ids)
        except Exception as error:  # Redis down: the next pass tries again, and nothing is lost meanwhile
            logger.warning(
                "outbox relay: the claims of %d operation(s)' first steps could not be read (%s: %s)",
                len(ids),
                type(error).__name__,
                error,
            )
            break
        known_sent = [operation_id for operation_id, state in zip(ids, states, strict=True) if state is Claim.SENT]
        if known_sent:
            with session_scope() as session:
                _clear_marks(session, known_sent)
        unsent = [operation_id for operation_id, state in zip(ids, states, strict=True) if state is None]
        outcomes = [_deliver_first_steps(broker, operation_id) for operation_id in unsent]
        sent += outcomes.count(Claim.TAKEN)
        cleared = len(known_sent) + sum(outcome in (Claim.TAKEN, Claim.SENT) for outcome in outcomes)
        if len(ids) < RELAY_BATCH or cleared == 0:
            break
    return sent


def relay(broker: dramatiq.Broker, *, older_than_s: float | None = None) -> int:
    """Send every outbox row, and every operation's first steps, left unsent past the grace period
    (``JOBS_OUTBOX_GRACE_S``): the committing process had that long to send them itself. Returns how many
    rows and operations were sent."""
    grace = get_settings().outbox_grace_s if older_than_s is None else older_than_s
    sent = _relay_first_steps(broker, grace)
    while True:
        with read_scope() as session:
            ids = pending(session, older_than_s=grace)
        outcomes = [_deliver(broker, row_id, "?") for row_id in ids]
        sent += outcomes.count(Claim.TAKEN)
        cleared = sum(outcome in (Claim.TAKEN, Claim.SENT) for outcome in outcomes)
        if len(ids) < RELAY_BATCH or cleared == 0:
            break
    outbox_relayed(sent)
    if sent:
        logger.warning("outbox relay sent %d message batch(es) their committing process had left unsent", sent)
    return sent


class OutboxRelay(Middleware):
    """Runs the relay in every worker process, every ``JOBS_OUTBOX_RELAY_INTERVAL_S``: rows left unsent
    are in the broker within about grace + interval of their commit, once the broker answers."""

    def __init__(self, interval_s: float | None = None) -> None:
        self.interval_s = interval_s
        self._heartbeat: Heartbeat | None = None

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        interval = self.interval_s or get_settings().outbox_relay_interval_s
        self._heartbeat = Heartbeat("outbox-relay", interval, lambda: relay(broker))
        self._heartbeat.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
