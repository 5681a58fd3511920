"""Signals go only to the middleware that handle them.

Dramatiq's ``Broker.emit_before``/``emit_after`` look up and call the hook of every middleware for every signal,
and ``Middleware`` defines every hook as a no-op: with this project's fifteen middleware, a step's signals
(before and after processing, acknowledging, enqueueing what follows) make about fifty calls that do nothing,
some 3% of a worker's CPU for a no-op step. Here each signal keeps the list of the hooks that do something,
rebuilt whenever the broker's middleware list has changed (``add_middleware``, or a test editing the list in
place), so the order, the arguments and the handling of a hook's error stay Dramatiq's own. The hook itself is
looked up at each signal, as Dramatiq does, so one replaced on a middleware (a test's patch) is the one called.

Written by hand: Dramatiq has no setting for it, and this is its two emit methods with a cache in front.
"""

from __future__ import annotations

from typing import Any

from dramatiq.middleware import Middleware, MiddlewareError

__all__ = ["HandlersOnly", "handlers_of"]


def handlers_of(middleware: list[Middleware], hook: str) -> list[Middleware]:
    """The middleware whose ``hook`` is not ``Middleware``'s no-op, in list order. One without the hook at all
    stays in, so that the signal fails for it as Dramatiq's would."""
    noop = getattr(Middleware, hook, None)
    if noop is None:
        return list(middleware)
    return [each for each in middleware if getattr(getattr(each, hook, None), "__func__", None) is not noop]


class HandlersOnly:
    """A mixin before a Dramatiq broker class: its signals skip the middleware that do not handle them."""

    middleware: list[Middleware]
    logger: Any

    def _handlers(self, hook: str) -> list[Middleware]:
        cache: dict[str, tuple[list[Middleware], list[Middleware]]] = self.__dict__.setdefault("_handlers_by_hook", {})
        cached = cache.get(hook)
        # A list compared with a list: element by element, by identity first, in C; cheaper than one lookup.
        if cached is None or cached[0] != self.middleware:
            cached = (list(self.middleware), handlers_of(self.middleware, hook))
            cache[hook] = cached
        return cached[1]

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        hook = "before_" + signal
        for middleware in self._handlers(hook):
            try:
                getattr(middleware, hook)(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", hook, middleware, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        hook = "after_" + signal
        for middleware in reversed(self._handlers(hook)):
            try:
                getattr(middleware, hook)(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", hook, middleware, exc_info=True)
