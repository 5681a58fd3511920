"""Per-scope concurrency throttle spanning whole operations (see ``middleware.py``)."""

from .middleware import Throttle, ThrottleUnavailable, find_throttle, scopes_of
from .scopes import ThrottleScope
from .store import Admission, Explanation, Guard, Handoff, Holder, ThrottleStore, Waiter

__all__ = [
    "Admission",
    "Explanation",
    "Guard",
    "Handoff",
    "Holder",
    "Throttle",
    "ThrottleScope",
    "ThrottleStore",
    "ThrottleUnavailable",
    "Waiter",
    "find_throttle",
    "scopes_of",
]
