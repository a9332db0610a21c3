"""One spelling per mailbox: :func:`canonical`, wherever two addresses must compare equal.

``user@bücher.example``, ``USER@xn--bcher-kva.example``, ``"user"@Bücher.example`` and
``Ann <user@bu\u0308cher.example>`` (a decomposed ü) all reach the same mailbox, and
:func:`canonical` gives each of them ``user@xn--bcher-kva.example``. The suppression list
stores and compares these (:mod:`kipekee.suppression`), so no spelling slips past it;
use the same function wherever your own code needs one row per mailbox (a subscriber
list, an invitation per address).

A leaf module: it imports nothing from Kipekee, so every layer may use it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from email.errors import HeaderParseError
from email.headerregistry import AddressHeader

__all__ = ["canonical"]

# RFC 5322 atext; non-ASCII counts as atext too (RFC 6532).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# Lower-case ASCII dot-atom @ ASCII host name: already canonical once lower-cased (the
# common case on every enqueue, kept free of the header parser's ~0.1 ms).
_PLAIN = re.compile(
    r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
)


def canonical(address: str) -> str:
    """The one spelling of the mailbox ``address`` names, for comparing and storing.

    - the addr-spec only: a display name, comments and angle brackets are dropped;
    - the local part lower-cased (every provider Kipekee sends through treats it
      case-insensitively), Unicode NFC, and quoted only when it must be
      (``"user"@x`` is ``user@x``; ``"a b"@x`` stays quoted, with minimal escapes);
    - the domain as its ASCII (IDNA) form, lower-cased: ``bücher.example``, its
      decomposed spelling and ``xn--bcher-kva.example`` are one domain. It is the
      encoding Django (and so Kipekee) puts in the SMTP envelope;
    - sub-addresses (``ann+news@x``) and dots stay: they may be different mailboxes.

    Never raises: text that is not one address comes back stripped, NFC and lower-cased,
    so it still equals itself and nothing else. ``canonical(canonical(a)) == canonical(a)``.
    """
    if address.isascii():
        lowered = address.strip().lower()
        if _PLAIN.fullmatch(lowered):
            return lowered
    return _canonical(address)


@functools.lru_cache(maxsize=4096)
def _canonical(address: str) -> str:
    fallback = unicodedata.normalize("NFC", address.strip()).lower()
    try:
        mailboxes = AddressHeader.value_parser(address).all_mailboxes
    except (HeaderParseError, IndexError, ValueError):  # the stdlib parser raises these
        return fallback
    if len(mailboxes) != 1 or not mailboxes[0].local_part or not mailboxes[0].domain:
        return fallback
    local = unicodedata.normalize("NFC", mailboxes[0].local_part).lower()
    if not _DOT_ATOM.fullmatch(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{_domain(mailboxes[0].domain)}"


def _domain(domain: str) -> str:
    domain = unicodedata.normalize("NFC", domain).lower()
    if domain.startswith("["):  # an address literal, [127.0.0.1]
        return domain
    try:
        # The stdlib's IDNA 2003 codec (nameprep: NFKC and case folding), as Django's
        # punycode() uses for the envelope.
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:  # an empty or over-long label: no DNS name, keep it as written
        return domain
