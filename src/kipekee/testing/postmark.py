"""A local HTTP server that follows Postmark's documented email API, for tests and demos.

    with LocalPostmarkServer(tokens={TOKEN}) as server:
        ...  # the provider's OPTIONS: {"server_token": TOKEN, "api_url": server.api_url}

The contract (postmarkapp.com/developer/api/email-api and the API overview's error codes):

- ``POST /email`` (one message), ``POST /email/batch`` (a JSON array of at most 500),
  authenticated by ``X-Postmark-Server-Token``; missing or wrong: 401 with ``ErrorCode`` 10;
- an answer per message ``{"To", "SubmittedAt", "MessageID", "ErrorCode": 0,
  "Message": "OK"}`` (the batch answers an array, one per message, always 200);
- errors ``{"ErrorCode": n, "Message": "..."}``: 422 with ``ErrorCode`` 300 (invalid
  request: no body, an invalid address, more than 50 recipients), 400 (the From is not a
  sender signature, with ``verified_senders``), 406 (every recipient inactive); 429
  ``ErrorCode`` 429; 500. Inactive recipients among others are left out of a 200 answer
  whose ``Message`` names them.

Tracking webhooks (:meth:`LocalPostmarkServer.webhook`): one JSON event per request
(``RecordType`` Delivery, Bounce, SpamComplaint, SubscriptionChange), authenticated by
the basic auth in the webhook URL (Postmark does not sign).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import getaddresses
from typing import Any

from .esp import ContractServer, ESPFaults, Refused, Reply

__all__ = ["LocalPostmarkServer"]

MAX_BATCH = 500
MAX_RECIPIENTS = 50
_ERRORS = {
    401: (10, ("The Server API token you provided in the X-Postmark-Server-Token request header "
              "was invalid. Please verify that you are using a valid token.")),
    422: (300, "Invalid email request"),
    429: (429, "Rate Limit Exceeded"),
    500: (0, "Internal Server Error"),
    503: (100, "Maintenance"),
}


class LocalPostmarkServer(ContractServer):
    esp_name = "Postmark"

    def __init__(self, *, tokens: Iterable[str] = ("postmark-token",),
                 verified_senders: Iterable[str] | None = None,
                 inactive: Iterable[str] = (), faults: ESPFaults | None = None,
                 **kwargs: Any) -> None:
        super().__init__(faults=faults, **kwargs)
        self.tokens = set(tokens)
        #: Sender signatures (addresses or domains); None accepts every From.
        self.verified_senders = (None if verified_senders is None
                                 else {s.lower() for s in verified_senders})
        #: Recipients that bounced or complained before (Postmark's "inactive").
        self.inactive = {a.lower() for a in inactive}

    @property
    def api_url(self) -> str:
        return self.base_url + "/"

    def error(self, status: int, reason: str = "") -> Reply:
        code, text = _ERRORS.get(status, (0, f"HTTP {status}"))
        return Reply.json(status, {"ErrorCode": code,
                                   "Message": f"{text} ({reason})" if reason else text})

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        path = path.split("?", 1)[0]
        if method != "POST" or path not in ("/email", "/email/batch"):
            return Reply.json(404, {"ErrorCode": 0, "Message": "Not Found"})
        if headers.get("x-postmark-server-token") not in self.tokens:
            return self.error(401)
        self.forced()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return Reply.json(422, {"ErrorCode": 402, "Message": "Invalid JSON"})
        if path == "/email":
            if not isinstance(data, dict):
                return Reply.json(422, {"ErrorCode": 403, "Message": "Incompatible JSON"})
            return Reply.json(200, self._one(data))
        if not isinstance(data, list):
            return Reply.json(422, {"ErrorCode": 403, "Message": "Incompatible JSON"})
        if len(data) > MAX_BATCH:
            return Reply.json(422, {"ErrorCode": 410, "Message": "Too many batch messages"})
        answers = []
        for item in data:
            try:
                answers.append(self._one(item if isinstance(item, dict) else {}))
            except Refused as refused:
                if refused.reply.status == 401:
                    raise
                answers.append(json.loads(refused.reply.body))
        return Reply.json(200, answers)

    def _one(self, message: dict[str, Any]) -> dict[str, Any]:
        """Validate and accept one message; its answer, or raise the documented error."""
        def invalid(text: str) -> Refused:
            return Refused(Reply.json(422, {"ErrorCode": 300, "Message": text}))

        sender = getaddresses([str(message.get("From") or "")])
        if not sender or "@" not in sender[0][1]:
            raise invalid(f"Invalid 'From' address: '{message.get('From') or ''}'.")
        fields: dict[str, list[str]] = {}
        for key in ("To", "Cc", "Bcc"):
            addresses = [a for _, a in getaddresses([str(message.get(key) or "")]) if a]
            for address in addresses:
                if "@" not in address:
                    raise invalid(f"Invalid '{key}' address: '{address}'.")
            fields[key] = addresses
        recipients = [a for key in ("To", "Cc", "Bcc") for a in fields[key]]
        if not recipients:
            raise invalid("Zero recipients specified")
        if len(recipients) > MAX_RECIPIENTS:
            raise invalid(f"Maximum of {MAX_RECIPIENTS} recipients allowed")
        if not (message.get("TextBody") or message.get("HtmlBody")):
            raise invalid("Provide either email TextBody or HtmlBody or both.")
        for attachment in message.get("Attachments") or []:
            try:
                base64.b64decode(attachment.get("Content") or "", validate=True)
            except (binascii.Error, ValueError, AttributeError):
                raise invalid("Invalid attachment content.") from None
        address = sender[0][1].lower()
        if self.verified_senders is not None and not (
                address in self.verified_senders
                or address.rpartition("@")[2] in self.verified_senders):
            raise Refused(Reply.json(422, {"ErrorCode": 400, "Message": (
                f"The 'From' address you supplied ({sender[0][1]}) is not a Sender Signature "
                "on your account. Please add and confirm this address in order to be able "
                "to use it in the 'From' field of your messages.")}))
        self.refused_recipient(recipients)
        inactive = [a.lower() for a in recipients if a.lower() in self.inactive]
        if inactive and len(inactive) == len(recipients):
            raise Refused(Reply.json(422, {"ErrorCode": 406, "Message": (
                "You tried to send to recipient(s) that have been marked as inactive.\n"
                f"Found inactive addresses: {', '.join(inactive)}.\n"
                "Inactive recipients are ones that have generated a hard bounce, a spam "
                "complaint, or a manual suppression. ")}))
        message_id = str(uuid.uuid4())
        self.accept({**message, "to": [a for a in recipients if a.lower() not in inactive],
                     "subject": message.get("Subject", ""), "message_id": message_id})
        text = "OK"
        if inactive:
            text = (f"Message OK, but will not deliver to these inactive addresses: "
                    f"{', '.join(inactive)}. Inactive recipients are ones that have generated "
                    "a hard bounce or a spam complaint.")
        answer: dict[str, Any] = {"SubmittedAt": datetime.now(UTC).isoformat(),
                                  "MessageID": message_id, "ErrorCode": 0, "Message": text}
        if message.get("To"):
            answer["To"] = message["To"]
        return answer

    # -- webhooks ---------------------------------------------------------------------

    def webhook(self, record_type: str, message_id: str, recipient: str, *,
                bounce_type: str = "HardBounce", details: str = "",
                event_id: int | None = None) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one tracking webhook as Postmark posts it:
        ``record_type`` Delivery, Bounce (``bounce_type`` HardBounce, SoftBounce, …),
        SpamComplaint or SubscriptionChange."""
        now = datetime.now(UTC).isoformat()
        event: dict[str, Any] = {"RecordType": record_type, "MessageID": message_id,
                                 "MessageStream": "outbound", "Metadata": {}, "Tag": ""}
        if record_type == "Delivery":
            event.update(Recipient=recipient, DeliveredAt=now, Details=details or "250 OK")
        elif record_type in ("Bounce", "SpamComplaint"):
            event.update(ID=event_id or uuid.uuid4().int % 10**10, Email=recipient,
                         Type=bounce_type if record_type == "Bounce" else "SpamComplaint",
                         TypeCode=1, Name=bounce_type, BouncedAt=now, Inactive=True,
                         Details=details or "smtp;550 5.1.1 The email account does not exist",
                         Description="The server was unable to deliver your message.")
        elif record_type == "SubscriptionChange":
            event.update(Recipient=recipient, ChangedAt=now, SuppressSending=True,
                         SuppressionReason="ManualSuppression")
        return json.dumps(event).encode(), {"Content-Type": "application/json"}
