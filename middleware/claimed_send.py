"""A claim, its messages' stores and its mark as sent, in one round trip that is not waited for.

The committing process of an operation with no throttle scope sends its first steps as any sender does: take their
claim (named by the operation's id), store the messages, mark the claim sent (``outbox_claims``), three round
trips, each waited for. On the project's Redis broker, when the claims live on the broker's server, the three go
together (``ThreadConnections.send_ahead``): a script takes the claim and, only if it was free, sets a key that lets
the stores through; the stores follow; a last script marks the claim sent only if that key is still there, and
deletes it. The claim is marked sent only after the stores. A connection lost between them leaves a claim that
lapses (``CLAIM_TTL_MS``), and the relay then sends the messages. It may send them again, which the steps'
idempotency makes harmless, as for a sender killed between its send and its mark.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence

import redis
from redis.commands.core import Script

from resources.config import get_settings
from resources.redis_client import ThreadConnections

from .outbox_claims import CLAIM_TTL_MS, claiming_value, forget, mark_sent, sent_claim
from .throttle.store import GuardedCall

__all__ = ["ClaimedSend", "load_scripts", "send_claimed"]

_TAKE = """
-- KEYS[1]: the claim. ARGV[1], ARGV[2]: this sender's claim and its expiry (ms). ARGV[3]: the key that lets
-- this sender's stores through, set only when the claim was free.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('SET', ARGV[3], '1', 'PX', 60000)
  return 1
end
return 0
"""
_MARK = """
-- KEYS[1]: the claim. ARGV[1]: the key _TAKE set. ARGV[2], ARGV[3]: the claim once sent, its expiry.
if redis.call('DEL', ARGV[1]) == 1 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

#: What the answer is: True when the claim was taken, the messages stored and the claim marked sent here; False
#: when another sender has it; None when the server lacked this module's scripts and nothing was done (send the
#: usual way, then ``load_scripts``); or the error that kept it from being done.
ClaimedSend = bool | None | Exception


@functools.cache
def _scripts(client: redis.Redis) -> tuple[Script, Script]:
    return client.register_script(_TAKE), client.register_script(_MARK)


def send_claimed(
    client: ThreadConnections,
    name: str,
    token: str,
    stores: Sequence[GuardedCall],
    answer: Callable[[ClaimedSend], None],
) -> None:
    """Take claim ``name`` (an operation's id) as ``token``, make ``stores`` if it was free, and mark the claim sent, in
    one round trip sent ahead; ``answer`` gets the outcome once the replies are read. A failed send raises here."""
    take, mark = _scripts(client)
    claim_key, sent, sent_ttl_ms = sent_claim(name)
    opened = f"{get_settings().namespace}:outbox-open:{uuid.uuid4().hex}"
    commands = [
        ("EVALSHA", take.sha, 1, claim_key, claiming_value(token), CLAIM_TTL_MS, opened),
        *(("EVALSHA", store.script.sha, len(store.keys), *store.keys, *store.guarded_args(opened)) for store in stores),
        ("EVALSHA", mark.sha, 1, claim_key, opened, sent, sent_ttl_ms),
    ]

    def read(replies: list | Exception) -> None:
        try:
            outcome = _outcome(name, stores, replies)
        except Exception as error:
            outcome = error
        answer(outcome)

    client.send_ahead(commands, read)


def _outcome(name: str, stores: Sequence[GuardedCall], replies: list | Exception) -> ClaimedSend:
    if isinstance(replies, Exception):
        return replies
    taken, *stored, marked = replies
    if isinstance(taken, redis.exceptions.NoScriptError):
        # Nothing ran. The caller sends the usual way, which loads the broker's scripts again, and then loads these:
        # where these are loaded, so are those.
        return None
    if isinstance(taken, Exception):
        raise taken
    if not taken:
        return False
    try:
        for store, reply in zip(stores, stored, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                store.run()  # the claim is ours, so its guard would have let it through
            elif isinstance(reply, Exception):
                raise reply
    except Exception:
        forget([name])  # its claim, marked sent or about to lapse: the relay must send the messages now
        raise
    if isinstance(marked, Exception):  # the server lost the scripts after the stores ran: mark it by hand
        mark_sent(name)
    return True


def load_scripts(client: redis.Redis) -> None:
    """Load this module's scripts on ``client``'s server (after a send the usual way loaded the broker's)."""
    for script in _scripts(client):
        client.script_load(script.script)
