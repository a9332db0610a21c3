"""Kipekee's input rules, asked ahead: will Kipekee accept this address, this subject?

The same rules every path into the outbox applies (:func:`kipekee.message.validate`),
exported one function each, so that a form (see :mod:`kipekee.forms`), an API serializer
or an import script refuses exactly what ``kipekee.send`` would refuse, and never hands
it a value that then fails with ``InvalidMessage`` (a 500 in a view). Both raise
:class:`~kipekee.exceptions.InvalidMessage`, naming the problem, and return quietly
otherwise.
"""

from __future__ import annotations

from . import message

__all__ = ["check_address", "check_header_text"]


def check_address(address: str) -> str:
    """Raise ``InvalidMessage`` unless Kipekee sends to ``address`` (``a@example.com`` or
    ``Name <a@example.com>``) as a recipient, sender or Reply-To; return its addr-spec."""
    return message.check_address("address", address)


def check_header_text(text: str) -> None:
    """Raise ``InvalidMessage`` unless ``text`` can be a subject or a header value (a
    name that goes into a subject, say): one line, without CR, LF or any other line
    break Python's ``str.splitlines()`` knows (``\\v``, ``\\f``, ``\\x85``, ``\\u2028`` …), and
    without NUL."""
    # message's own check (private there: this module is its public face).
    message._check_text("text", text)
