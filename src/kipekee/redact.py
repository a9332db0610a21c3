"""Keep provider secrets out of everything Kipekee records, logs or raises.

A provider's secrets are the values of its ``OPTIONS`` whose names say so (``password``,
``api_key``, ``token``, ``secret``…). Error text comes from outside — an SMTP server's
reply, an HTTP API's body, a backend's exception — and a hostile or careless one echoes
what it was sent (``535 bad credentials for ann:hunter2``). :func:`redact` replaces each
secret, and the base64 forms in which SMTP AUTH sends it, with ``[redacted]``.

It runs where a failure's text is made (:func:`kipekee.providers.classify`), so the
outbox row, the attempt, the logs and the receipt only ever see the redacted text, and
again in :mod:`kipekee.outbox` before anything is written, as a last fence.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from typing import Any

from . import conf
from .exceptions import ConfigurationError

REDACTED = "[redacted]"

# Option names that hold secrets; "…file"/"…path" options hold paths to them, not secrets.
_SECRET_NAME = re.compile(r"pass|secret|token|key|credential|auth", re.I)
_PATH_NAME = re.compile(r"(file|path|dir)$", re.I)
# Shorter values would redact ordinary words ("on", "a"); no real secret is that short.
_MIN_LENGTH = 4


def secret_values(options: Mapping[str, Any]) -> set[str]:
    """The secret strings in one provider's ``OPTIONS``, with their SMTP AUTH encodings."""
    found: set[str] = set()
    username = str(options.get("username") or options.get("user") or "")
    for name, value in options.items():
        if not isinstance(value, str) or len(value) < _MIN_LENGTH:
            continue
        if not _SECRET_NAME.search(name) or _PATH_NAME.search(name):
            continue
        found.add(value)
        # AUTH LOGIN sends base64(password); AUTH PLAIN base64("\0user\0password").
        found.add(_b64(value))
        if username:
            found.add(_b64(f"\0{username}\0{value}"))
    return found


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def configured_secrets() -> set[str]:
    """Every secret of every configured provider (empty if the settings do not parse)."""
    try:
        providers = conf.get().providers
    except ConfigurationError:
        return set()
    found: set[str] = set()
    for provider in providers:
        found |= secret_values(provider.options)
    return found


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with each secret (default: the configured providers') replaced."""
    if not text:
        return text
    values = configured_secrets() if secrets is None else set(secrets)
    # Longest first: a secret that contains another is replaced whole.
    for value in sorted(values, key=len, reverse=True):
        if value and value in text:
            text = text.replace(value, REDACTED)
    return text
