"""Connection URLs with their passwords hidden, for anything that prints or logs one.

A URL may carry a password in its user info (``redis://user:pw@host``, ``postgresql://user:pw@host/db``)
or in its query string (``unix:///run/redis.sock?password=pw``). :func:`redact_url` replaces each with
``***``; :func:`redact_text` does the same in free text, such as a driver's error message that quotes a URL.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

__all__ = ["REDACTED", "redact_text", "redact_url", "url_secrets"]

REDACTED = "***"
#: Query parameters holding a secret: these names exactly, and any name containing one of _SECRET_PARTS.
_SECRET_NAMES = frozenset({"pass", "auth", "key"})
_SECRET_PARTS = ("password", "passwd", "pwd", "secret", "token")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
#: host, [IPv6], optionally :port -- an authority without user info.
_PLAIN_AUTHORITY = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(:\d*)?")
#: A URL inside free text: up to whitespace, a quote or a bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>()]+")


def _is_secret(name: str) -> bool:
    name = unquote_plus(name).lower()
    return name in _SECRET_NAMES or any(part in name for part in _SECRET_PARTS)


def _split(url: str) -> tuple[str, list[str]]:
    """The URL with every password replaced, and the passwords found (as written and decoded)."""
    match = _SCHEME.match(url)
    head, rest = (url[: match.end()], url[match.end() :]) if match else ("", url)
    secrets: list[str] = []
    authority_end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    at = rest.rfind("@", 0, authority_end)
    if at == -1 and "@" in rest[authority_end:] and not _PLAIN_AUTHORITY.fullmatch(rest[:authority_end]):
        # A '/', '?' or '#' left unencoded in the password ended the authority early ("user:pa/ss@host"):
        # the user info runs to the last '@'. Hiding too much beats showing part of a password.
        at = rest.rfind("@")
    start = 0
    if at != -1:
        user, colon, password = rest[:at].partition(":")
        if colon and password:
            secrets += [password, unquote(password)]
            rest = f"{user}:{REDACTED}{rest[at:]}"
            at = len(user) + 1 + len(REDACTED)
        start = at + 1
    query_at = rest.find("?", start)
    if query_at != -1:
        fragment_at = rest.find("#", query_at)
        query_end = len(rest) if fragment_at == -1 else fragment_at
        pairs = []
        for pair in re.split(r"([&;])", rest[query_at + 1 : query_end]):
            name, equals, value = pair.partition("=")
            if equals and value and _is_secret(name):
                secrets += [value, unquote_plus(value)]
                pair = f"{name}={REDACTED}"
            pairs.append(pair)
        rest = f"{rest[: query_at + 1]}{''.join(pairs)}{rest[query_end:]}"
    return head + rest, [s for s in dict.fromkeys(secrets) if s and s != REDACTED]


def redact_url(url: str) -> str:
    """``url`` with any password (in its user info or its query string) replaced by ``***``.

    Never raises: a string that is not a URL comes back with whatever looks like a password hidden.
    """
    return _split(url)[0]


def url_secrets(url: str) -> list[str]:
    """The passwords ``url`` carries, as written and percent-decoded (empty if it has none)."""
    return _split(url)[1]


def redact_text(text: str, *urls: str | None) -> str:
    """``text`` with the passwords of ``urls`` removed wherever they occur, and every URL in it redacted.

    For messages written by someone else (a driver's error), which may quote a URL or its password.
    """
    secrets = {secret for url in urls if url for secret in url_secrets(url)}
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one may contain another
        text = text.replace(secret, REDACTED)
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
