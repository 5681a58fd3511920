"""Who sends an outbox row, or an operation's first steps: a claim in Redis, taken by whichever sender comes
first. The claim of an operation's first steps is named by the operation's id, a row's by the row's.

An operation's first steps have two possible senders. Its committing process sends them straight after the
commit, without a database transaction (``outbox.send_first_steps``); the relay sends them under the
operation's row lock. Both take the claim first (``SET NX``), so one of them sends; the winner then marks the
claim sent, and whoever finds it marked sent only clears the operation's mark. Rows work the same way, their
senders being ``deliver`` and the relay, and a row whose claim says sent is deleted unsent.

A claim lapses after ``CLAIM_TTL_MS``: a sender killed between its claim and its mark leaves the row to
the relay then, which sends it again (the steps' idempotency makes that harmless, as it does for a
sender killed between its send and the delete of its row).
"""

from __future__ import annotations

import enum
import logging
import uuid

import redis

from resources.config import get_settings
from resources.redis_client import get_redis

__all__ = [
    "CLAIM_TTL_MS",
    "SENT_TTL_MS",
    "Claim",
    "claim",
    "claim_key",
    "claim_states",
    "claiming_value",
    "forget",
    "mark_sent",
    "new_token",
    "release",
    "sent_claim",
]

#: How long a claim keeps other senders off a row: far longer than a send takes.
CLAIM_TTL_MS = 30_000
#: How long a sent mark lasts: it must outlive the row, or the operation's mark (the relay clears them within
#: seconds of the grace period), and any late claim by a committing process that stalled past the relay's grace
#: period. An operation's end deletes its claim.
SENT_TTL_MS = 24 * 3600 * 1000

logger = logging.getLogger(__name__)

_SENDING = "sending:"
_SENT = "sent"
# Delete a claim only if it is still the caller's: one that lapsed may have been taken by another sender.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Claim(enum.Enum):
    """What a sender's claim on a row came to."""

    #: This sender has the row: send it, then mark it sent.
    TAKEN = "taken"
    #: Another sender is sending it now, or was killed doing so (the claim lapses): leave it.
    BUSY = "busy"
    #: It was sent: delete it unsent.
    SENT = "sent"


def _key(row_id: str) -> str:
    return f"{get_settings().namespace}:outbox:{row_id}"


def new_token() -> str:
    """A sender's name for its claims."""
    return uuid.uuid4().hex


def claiming_value(token: str) -> str:
    """A row's claim as it stands while the sender named ``token`` sends it (for a sender that takes it inside a
    script of its own)."""
    return _SENDING + token


def claim(row_id: str, token: str) -> Claim:
    """Try to become the row's one sender."""
    client = get_redis()
    if client.set(_key(row_id), claiming_value(token), nx=True, px=CLAIM_TTL_MS):
        return Claim.TAKEN
    return Claim.SENT if client.get(_key(row_id)) == _SENT else Claim.BUSY


def claim_states(names: list[str]) -> list[Claim | None]:
    """What the claims named (row or operation ids) stand at, in one round trip: ``Claim.SENT``, ``Claim.BUSY``
    (being sent), or None (no claim: nobody has sent them, or the claim lapsed)."""
    values = get_redis().mget([_key(name) for name in names]) if names else []
    return [None if value is None else Claim.SENT if value == _SENT else Claim.BUSY for value in values]


def release(row_id: str, token: str) -> None:
    """Give up a claim whose send failed, so that the relay need not wait for it to lapse."""
    # Rare (a failed send), so the script is not kept: register_script only hashes it, and runs it by EVALSHA.
    get_redis().register_script(_RELEASE)(keys=[_key(row_id)], args=[_SENDING + token])


def claim_key(row_id: str) -> str:
    """Where the row's claim is kept (for a sender that takes it inside a script of its own)."""
    return _key(row_id)


def sent_claim(row_id: str) -> tuple[str, str, int]:
    """The row's claim as it stands once the row is sent (key, value, expiry in ms): for a sender that takes
    it inside a script of its own, sent at once."""
    return _key(row_id), _SENT, SENT_TTL_MS


def mark_sent(row_id: str) -> None:
    """The claimed row is in the broker: any later sender deletes it unsent."""
    get_redis().set(_key(row_id), _SENT, px=SENT_TTL_MS)


def forget(names: list[str]) -> None:
    """Drop the claims of rows that are deleted, or of operations that have ended, which no late sender can claim
    any more. A failure is harmless (the claims expire on their own), so it is logged, not raised."""
    if not names:
        return
    try:
        get_redis().delete(*map(_key, names))
    except redis.RedisError as error:
        logger.info("could not drop %d outbox claim(s): %s", len(names), error)
