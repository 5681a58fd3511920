"""A Dramatiq ``MessageProxy`` that holds its message's fields as its own attributes.

Dramatiq's proxy reads every field of its message through ``__getattr__``, which Python calls only after the
ordinary lookup has failed and raised an AttributeError inside: the slowest way to read an attribute. A step's
middleware read its fields about forty times (``options``, ``actor_name``, ``message_id``...), so a worker pays
that for every step it runs. The fields of a Message (a frozen dataclass) never change, and its ``options`` is
one dict that both share, so a copy of the references reads the same values. Anything else (the message's
methods, attributes a subclass adds) is still read through the message.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dramatiq import Message
from dramatiq.broker import MessageProxy

__all__ = ["FieldsProxy"]

#: A Message's fields, by name: read one by one rather than as the message's ``__dict__``, which a dataclass with
#: slots would not have.
_FIELDS = tuple(field.name for field in dataclasses.fields(Message))


class FieldsProxy(MessageProxy):
    """``MessageProxy(message)``, its message's fields read at the speed of its own attributes."""

    def __init__(self, message: Message[Any]) -> None:
        super().__init__(message)
        # The proxy's own attributes (failed, _message, _exception) are none of a message's field names.
        own = self.__dict__
        for name in _FIELDS:
            own[name] = getattr(message, name)
