"""The transactional outbox: messages are written in the transaction of the state change that orders
them and sent after it commits, so a commit is never left without its messages. It holds an operation's
first steps (``execute``), a failure's callbacks and slot release, and a completed step's successors
only when the broker refused them (see ``transitions``: otherwise a redelivery of the step covers a crash).

``stage`` adds the messages to the caller's transaction. After the commit, ``send_committed`` (the
committing process, which still has the messages) sends them with no second transaction and leaves the
row's delete to a background batch; ``deliver`` sends a row under its row lock and deletes it in the
same transaction. ``relay`` delivers rows a process left behind, killed between its commit and its send,
or cut off from the broker. Every sender first takes the row's claim in Redis (``outbox_claims``), so
two senders never both send it; a sender killed after its send but before it marks the row sent leaves a
row that is sent again, which the steps' idempotency makes harmless. A throttled operation's first steps are
the exception: the committing process takes the claim already marked sent, in the throttle's admission
script, since the throttle keeps those steps from then on and sends them again if they never start.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.middleware import Middleware
from sqlalchemy import Insert, bindparam, insert, select
from sqlalchemy.orm import Session

from resources.config import get_settings
from resources.db import read_scope, session_scope
from resources.metrics import outbox_relayed
from resources.models import OutboxMessage, new_uuid, utcnow
from resources.quick_statements import insert_with_next_statement, names_every_column, quick_insert
from resources.redis_client import ThreadConnections, get_redis

from .claimed_send import ClaimedSend, load_scripts, send_claimed
from .heartbeat import Heartbeat
from .outbox_claims import Claim, claim, forget, mark_sent, new_token, release, sent_claim
from .plan import message_fields
from .progress import Outgoing, deferring, enqueue_all
from .sent_rows import sent_rows
from .throttle import Admission, Guard, Throttle, ThrottleScope, find_throttle

__all__ = ["OutboxRelay", "deliver", "pending", "relay", "send_committed", "stage"]

logger = logging.getLogger(__name__)

_INSERT_ROW = insert(OutboxMessage.__table__)
#: Rows one relay pass reads at a time.
RELAY_BATCH = 200


def stage(
    session: Session,
    operation_id: str,
    outgoing: Sequence[Outgoing],
    *,
    throttle_scopes: Sequence[ThrottleScope] = (),
    release_throttle: bool = False,
    along: tuple[Insert, dict[str, Any]] | None = None,
) -> str | None:
    """Write ``outgoing`` to the outbox in ``session``'s transaction; returns the row id to ``deliver``
    after the commit (None when there is nothing to do). With ``throttle_scopes`` the messages are an
    operation's first steps, admitted or parked by the throttle when they are sent. ``release_throttle``
    (the operation has ended) frees its slot with the send: a crash cannot leave the slot taken. ``along``:
    another insert (statement, parameters) to make with the row, first (see ``_insert_with``)."""
    if not outgoing and not release_throttle:
        if along is not None:
            session.execute(*along)
        return None
    row_id = new_uuid()
    row = {
        "id": row_id,
        "operation_id": operation_id,
        "messages": [{"message": message_fields(item.message), "delay": item.delay} for item in outgoing],
        "throttle_scopes": [[scope.key, scope.limit] for scope in throttle_scopes] or None,
        "release_throttle": release_throttle,
        "created_at": utcnow(),
    }
    # A statement rather than an object: nothing reads the row back in this session, and the unit of work's
    # bookkeeping for one row costs more than the insert (it is in every execute()).
    if along is None:
        quick_insert(session, _INSERT_ROW, row)
    else:
        _insert_with(session, along, row)
    return row_id


#: The outbox row's parameters, when it is a WITH query of another insert.
_ROW_PARAMETER = "outbox_{}"


@functools.cache
def _with_row(statement: Insert) -> Insert:
    table = OutboxMessage.__table__
    values = {c: bindparam(_ROW_PARAMETER.format(c.key), type_=c.type) for c in table.c}
    return statement.add_cte(insert(table).values(values).cte("outbox_row"))


def _insert_with(session: Session, along: tuple[Insert, dict[str, Any]], row: dict[str, Any]) -> None:
    """The insert ``along`` and the outbox ``row``: on PostgreSQL one statement (the row a data-modifying WITH
    query of the other insert), which the project's dialect sends with the transaction's next statement, usually
    its COMMIT (``insert_with_next_statement``): no round trip of its own. Elsewhere, or when ``along``'s
    parameters leave a column to its Python default (which the WITH form would not apply), two statements."""
    statement, parameters = along
    if session.get_bind().dialect.name == "postgresql" and names_every_column(statement, parameters):
        both = _with_row(statement), {**parameters, **{_ROW_PARAMETER.format(k): v for k, v in row.items()}}
        if not insert_with_next_statement(session, *both):
            session.execute(*both)
        return
    quick_insert(session, statement, parameters)
    quick_insert(session, _INSERT_ROW, row)


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


def _claim_and_send(row_id: str, send: Callable[[], None]) -> Claim:
    """Send the row if this sender gets its claim, then mark it sent; a failed send gives the claim up, so
    that the relay need not wait for it to lapse."""
    token = new_token()
    outcome = claim(row_id, token)
    if outcome is Claim.TAKEN:
        try:
            send()
        except Exception:
            release(row_id, token)
            raise
        mark_sent(row_id)
    return outcome


def send_committed(
    broker: dramatiq.Broker,
    row_id: str | None,
    operation_id: str,
    outgoing: Sequence[Outgoing],
    *,
    throttle_scopes: Sequence[ThrottleScope] = (),
) -> bool:
    """Send the messages of outbox row ``row_id``, just committed by this process with these messages and
    scopes (what ``stage`` was given), without opening a transaction: claim the row, send, mark it sent,
    and leave the row to be deleted in a batch (for a throttled operation, see ``_admit_and_send``). Returns
    False when nothing was sent here: the relay had claimed the row (this process stalled past the grace
    period), or the send failed, which is logged, not raised, and leaves the row to the relay. On the project's
    Redis broker the claim, the send and the mark go in one round trip whose answer is read later
    (``_send_ahead``, ``_admit_and_send``): it returns True once that is sent, and a row the relay had claimed
    is left to it when the answer is read."""
    if row_id is None:
        return False
    throttle = find_throttle(broker)
    if throttle is not None and throttle.enabled and throttle_scopes and outgoing:
        return _admit_and_send(broker, throttle, row_id, operation_id, outgoing, throttle_scopes)

    def send() -> None:
        _send(broker, operation_id, outgoing, throttle_scopes, release_throttle=False)

    sent_ahead = _send_ahead(broker, row_id, operation_id, outgoing, send) if outgoing else None
    return _send_now(row_id, operation_id, send) if sent_ahead is None else sent_ahead


def _send_now(row_id: str, operation_id: str, send: Callable[[], None]) -> bool:
    try:
        if _claim_and_send(row_id, send) is not Claim.TAKEN:
            return False
    except Exception as error:
        _not_sent_yet(row_id, operation_id, error)
        return False
    sent_rows.add(row_id)
    return True


def _send_ahead(
    broker: dramatiq.Broker, row_id: str, operation_id: str, outgoing: Sequence[Outgoing], send: Callable[[], None]
) -> bool | None:
    """``send_committed`` for an operation the throttle does not hold, in one round trip not waited for
    (``claimed_send``), where the broker stores its messages on the claims' Redis server: True once sent, False
    when the send failed (logged; the row is left to the relay, as the usual way leaves it). None, having done
    nothing, elsewhere: the caller sends the usual way."""
    client = get_redis()
    defer = deferring(broker, client)
    if defer is None or not isinstance(client, ThreadConnections):
        return None
    with defer() as stores:
        enqueue_all(broker, outgoing)

    def answered(outcome: ClaimedSend) -> None:
        if outcome is None:  # the server had lost the scripts, and nothing was done: the usual way, then load them
            if _send_now(row_id, operation_id, send):
                load_scripts(client)
        elif isinstance(outcome, Exception):
            _not_sent_yet(row_id, operation_id, outcome)
        elif outcome:
            sent_rows.add(row_id)

    try:
        send_claimed(client, row_id, new_token(), stores, answered)
    except Exception as error:
        _not_sent_yet(row_id, operation_id, error)
        return False
    return True


def _admit_and_send(
    broker: dramatiq.Broker,
    throttle: Throttle,
    row_id: str,
    operation_id: str,
    outgoing: Sequence[Outgoing],
    scopes: Sequence[ThrottleScope],
) -> bool:
    """``send_committed`` for a throttled operation's first steps, in one round trip on the project's Redis broker
    (three fewer): the script that admits or parks the operation also takes the row's claim, marked sent at once,
    and a granted operation's steps are stored in the same round trip. The throttle keeps the steps
    from then on (it sends them when a parked operation's turn comes, and sends a granted operation's again if
    none has started within the hand-off timeout), so the row is done even if this process dies before its
    send. On that broker it returns once the round trip is sent, True, its answer read later (``admit_ahead``):
    a row the relay had claimed, or a failure, is then logged as the synchronous send would, not returned."""
    guard = Guard(*sent_claim(row_id))

    def answered(admission: Admission | Exception) -> None:
        if isinstance(admission, Exception):
            _not_sent_yet(row_id, operation_id, admission)
        elif admission.status != "guarded":  # guarded: another sender (the relay) has it
            sent_rows.add(row_id)

    try:
        # Without waiting for Redis's answer where the steps go with the admission: the row is done either way
        # (claimed and sent, or left to the relay), and the answer only says which.
        if throttle.admit_ahead(broker, operation_id, list(scopes), list(outgoing), guard=guard, answer=answered):
            return True
        admission = throttle.admit(broker, operation_id, list(scopes), list(outgoing), guard=guard, send=True)
    except Exception as error:
        _not_sent_yet(row_id, operation_id, error)
        return False
    if admission.status == "guarded":
        return False  # another sender (the relay) has it
    sent_rows.add(row_id)
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


def relay(broker: dramatiq.Broker, *, older_than_s: float | None = None) -> int:
    """Send every outbox row older than the grace period (``JOBS_OUTBOX_GRACE_S``): the committing
    process had that long to send it itself. Returns how many rows were sent."""
    grace = get_settings().outbox_grace_s if older_than_s is None else older_than_s
    sent = 0
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
