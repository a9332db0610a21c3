"""A local HTTP server that follows Amazon SES v2's documented SendEmail API, for tests.

Anymail's Amazon SES backend talks to SES through boto3; point boto3 at this server with
``endpoint_url``::

    with LocalSESServer(credentials={KEY_ID: SECRET_KEY}) as server:
        ...  # OPTIONS: {"client_params": server.client_params()}

The contract (the SES v2 API reference, "SendEmail" and "Common Errors", and the AWS
Signature Version 4 documentation):

- ``POST /v2/email/outbound-emails`` with a JSON body (``FromEmailAddress``,
  ``Destination`` {``ToAddresses``, ``CcAddresses``, ``BccAddresses``}, ``Content``
  {``Raw`` {``Data``: base64 MIME} | ``Simple`` | ``Template``}, ``ReplyToAddresses``,
  ``EmailTags``, ``ConfigurationSetName``), signed with Signature Version 4 (the
  signature is checked: an unknown access key gets 403 ``UnrecognizedClientException``, a
  wrong secret 403 ``SignatureDoesNotMatch``);
- 200 ``{"MessageId": "..."}``;
- errors: the ``x-amzn-ErrorType`` header names the error and the body is
  ``{"message": "..."}``: 400 ``BadRequestException`` (a request that fails validation),
  ``MessageRejected`` (in the sandbox, a recipient that is not a verified identity, with
  ``sandbox=True``), ``AccountSuspendedException``, ``SendingPausedException``; 404
  ``NotFoundException``; 429 ``TooManyRequestsException``; 500 ``InternalFailure``; 503
  ``ServiceUnavailable``.

Tracking webhooks (:meth:`LocalSESServer.webhook`): SES event publishing through an SNS
topic to an HTTPS subscription: an SNS ``Notification`` whose ``Message`` is the SES
event (``Bounce``, ``Complaint``, ``Delivery``), with the ``x-amz-sns-message-type`` and
``-id`` headers, authenticated by the basic auth in the subscription's URL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.utils import getaddresses
from typing import Any

from .esp import ContractServer, ESPFaults, Reply

__all__ = ["LocalSESServer"]

_ADDRESS = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request,"
                   r"\s*SignedHeaders=([^,]+),\s*Signature=([0-9a-f]+)")
_ERRORS = {
    400: ("BadRequestException", "Bad request"),
    403: ("AccessDeniedException", "Access denied"),
    404: ("NotFoundException", "Resource not found"),
    413: ("BadRequestException", "Message length is more than 40 MB"),
    429: ("TooManyRequestsException", "Too many requests"),
    500: ("InternalFailure", ("The request processing has failed because of an unknown "
                             "error, exception or failure.")),
    503: ("ServiceUnavailable", ("The request has failed due to a temporary failure of the "
                                "server.")),
}


def _error(status: int, error_type: str, message: str) -> Reply:
    return Reply.json(status, {"message": message}, **{"x-amzn-ErrorType": error_type,
                                                       "x-amzn-RequestId": str(uuid.uuid4())})


class LocalSESServer(ContractServer):
    esp_name = "Amazon SES"

    def __init__(self, *, credentials: Mapping[str, str] | None = None,
                 region: str = "us-east-1", sandbox: bool = False,
                 verified_identities: Iterable[str] = (), faults: ESPFaults | None = None,
                 **kwargs: Any) -> None:
        super().__init__(faults=faults, **kwargs)
        #: Access key id → secret access key.
        self.credentials = dict(credentials or {"AKIDKIPEKEETEST": "kipekee-test-secret"})
        self.region = region
        #: In the sandbox, every recipient must be a verified identity (an address or a
        #: domain of :attr:`verified_identities`).
        self.sandbox = sandbox
        self.verified_identities = {i.lower() for i in verified_identities}
        #: Set to an SES v2 error type (``AccountSuspendedException``, …) to refuse every
        #: send with it (400).
        self.account_error: str | None = None

    def client_params(self, access_key: str | None = None, secret: str | None = None,
                      **config: Any) -> dict[str, Any]:
        """boto3 client parameters for anymail's ``client_params`` option."""
        key = access_key or next(iter(self.credentials))
        return {"endpoint_url": self.base_url, "region_name": self.region,
                "aws_access_key_id": key,
                "aws_secret_access_key": secret or self.credentials.get(key, "x"),
                **({"config": config} if config else {})}

    def error(self, status: int, reason: str = "") -> Reply:
        error_type, text = _ERRORS.get(status, ("InternalFailure", f"HTTP {status}"))
        return _error(status, error_type, f"{text}: {reason}" if reason else text)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if method != "POST" or path.split("?", 1)[0] != "/v2/email/outbound-emails":
            return _error(404, "NotFoundException", "Not Found")
        refused = self._authenticate(method, path, headers, body)
        if refused is not None:
            return refused
        self.forced()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "SerializationException", "Invalid JSON")
        if self.account_error:
            return _error(400, self.account_error, "Sending is paused for this account.")
        destination = data.get("Destination") or {}
        content = data.get("Content") or {}
        raw = (content.get("Raw") or {}).get("Data")
        mime = None
        if raw is not None:
            try:
                mime = message_from_bytes(base64.b64decode(raw, validate=True),
                                          policy=policy.default)
            except (binascii.Error, ValueError):
                return _error(400, "BadRequestException", "Raw message data is not base64")
        elif not (content.get("Simple") or content.get("Template")):
            return _error(400, "BadRequestException",
                          "Content: one of Simple, Raw or Template is required")
        recipients = {key: list(destination.get(key) or [])
                      for key in ("ToAddresses", "CcAddresses", "BccAddresses")}
        if mime is not None and not any(recipients.values()):
            recipients["ToAddresses"] = [a for _, a in getaddresses(mime.get_all("To", []))]
            recipients["CcAddresses"] = [a for _, a in getaddresses(mime.get_all("Cc", []))]
        everyone = [a for addresses in recipients.values() for a in addresses]
        if not everyone:
            return _error(400, "BadRequestException", "Missing final '@domain'")
        sender = data.get("FromEmailAddress") or (mime.get("From", "") if mime else "")
        for address in [getaddresses([sender])[0][1] if sender else "", *everyone]:
            if not _ADDRESS.fullmatch(getaddresses([address])[0][1] or address):
                return _error(400, "BadRequestException",
                              f"Illegal address: {address!r}")
        if self.sandbox:
            unverified = [a for a in everyone if a.lower() not in self.verified_identities
                          and a.lower().rpartition("@")[2] not in self.verified_identities]
            if unverified:
                return _error(400, "MessageRejected", (
                    "Email address is not verified. The following identities failed the "
                    f"check in region {self.region.upper()}: {', '.join(unverified)}"))
        self.refused_recipient(everyone)
        message_id = f"0100{uuid.uuid4().hex[:12]}-{uuid.uuid4()}-000000"
        self.accept({"from": sender, "to": recipients["ToAddresses"],
                     "cc": recipients["CcAddresses"], "bcc": recipients["BccAddresses"],
                     "subject": str(mime.get("Subject", "")) if mime else "",
                     "mime": mime, "request": data, "message_id": message_id})
        return Reply.json(200, {"MessageId": message_id})

    def _authenticate(self, method: str, path: str, headers: dict[str, str],
                      body: bytes) -> Reply | None:
        """Check the Signature Version 4 of the request; the error answer, or None."""
        match = _AUTH.fullmatch(headers.get("authorization", "").strip())
        if not match:
            return _error(403, "MissingAuthenticationTokenException",
                          "Missing Authentication Token")
        key, date, region, service, signed, signature = match.groups()
        secret = self.credentials.get(key)
        if secret is None:
            return _error(403, "UnrecognizedClientException",
                          "The security token included in the request is invalid.")
        names = signed.split(";")
        canonical_headers = "".join(f"{n}:{' '.join(headers.get(n, '').split())}\n"
                                    for n in names)
        payload = headers.get("x-amz-content-sha256") or hashlib.sha256(body).hexdigest()
        uri, _, query = path.partition("?")
        canonical_query = "&".join(sorted(q for q in query.split("&") if q))
        canonical = "\n".join([method, uri, canonical_query, canonical_headers, signed, payload])
        scope = f"{date}/{region}/{service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", headers.get("x-amz-date", ""), scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        signing = ("AWS4" + secret).encode()
        for part in (date, region, service, "aws4_request"):
            signing = hmac.new(signing, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(signing, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return _error(403, "SignatureDoesNotMatch",
                          "The request signature we calculated does not match the signature "
                          "you provided. Check your AWS Secret Access Key and signing "
                          "method. Consult the service documentation for details.")
        return None

    # -- webhooks ---------------------------------------------------------------------

    def webhook(self, event_type: str, message_id: str, recipient: str, *,
                bounce_type: str = "Permanent") -> tuple[bytes, dict[str, str]]:
        """The body and headers of one SNS notification carrying an SES event:
        ``event_type`` Bounce (``bounce_type`` Permanent, Transient or Undetermined),
        Complaint or Delivery."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        mail = {"timestamp": now, "source": "sender@example.com", "messageId": message_id,
                "destination": [recipient], "headersTruncated": False, "headers": []}
        event: dict[str, Any] = {"eventType": event_type, "mail": mail}
        if event_type == "Bounce":
            event["bounce"] = {
                "bounceType": bounce_type, "bounceSubType": "General", "timestamp": now,
                "feedbackId": str(uuid.uuid4()),
                "bouncedRecipients": [{"emailAddress": recipient, "action": "failed",
                                       "status": "5.1.1",
                                       "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]}
        elif event_type == "Complaint":
            event["complaint"] = {"complainedRecipients": [{"emailAddress": recipient}],
                                  "timestamp": now, "feedbackId": str(uuid.uuid4()),
                                  "complaintFeedbackType": "abuse"}
        elif event_type == "Delivery":
            event["delivery"] = {"timestamp": now, "recipients": [recipient],
                                 "smtpResponse": "250 2.6.0 Message received",
                                 "processingTimeMillis": 500}
        sns_id = str(uuid.uuid4())
        body = {"Type": "Notification", "MessageId": sns_id,
                "TopicArn": f"arn:aws:sns:{self.region}:123456789012:ses-events",
                "Message": json.dumps(event), "Timestamp": now, "SignatureVersion": "1",
                "Signature": "not-checked-by-anymail",
                "SigningCertURL": f"https://sns.{self.region}.amazonaws.com/cert.pem",
                "UnsubscribeURL": f"https://sns.{self.region}.amazonaws.com/?unsubscribe"}
        return json.dumps(body).encode(), {"Content-Type": "text/plain; charset=UTF-8",
                                           "x-amz-sns-message-type": "Notification",
                                           "x-amz-sns-message-id": sns_id}

