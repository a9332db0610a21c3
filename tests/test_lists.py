"""Mailing lists: one-click unsubscribe (RFC 8058, RFC 2369) and per-list suppression.

The one-click POST is checked as RFC 8058 section 3.1 describes a mailbox provider's
request: a POST to the https URI, body ``List-Unsubscribe=One-Click`` (multipart/form-data
or application/x-www-form-urlencoded), no cookies, no authorization, no CSRF token, with
Django's CSRF middleware switched on. Mail is sent to a real local SMTP server and read
back from it.
"""

from __future__ import annotations

import base64
import json
import time
from email import message_from_bytes, policy
from typing import Any

import pytest
from django.core import signing
from django.db import IntegrityError
from django.test import Client, RequestFactory

import kipekee
from kipekee import lists, signals, suppression
from kipekee.exceptions import ConfigurationError, InvalidMessage, InvalidToken, UnknownMailingList
from kipekee.models import MailingList, OutboxEmail, Status, Unsubscription

from .conftest import smtp_provider

pytestmark = pytest.mark.django_db(transaction=True)

BASE_URL = "https://shop.example"
MAILTO = "unsubscribe@shop.example"
CSRF_ON = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]


@pytest.fixture
def sink(smtp_sink, kipekee_settings, settings):
    kipekee_settings({"UNSUBSCRIBE": {"BASE_URL": BASE_URL, "MAILTO": MAILTO}},
                     primary=smtp_provider(smtp_sink))
    settings.MIDDLEWARE = CSRF_ON
    return smtp_sink


@pytest.fixture
def newsletter(sink) -> MailingList:
    MailingList.objects.create(key="promotions", name="Promotions")
    return MailingList.objects.create(key="newsletter", name="Tours newsletter",
                                      description="Tours and offers, once a month.")


@pytest.fixture
def heard():
    """What the unsubscribed / resubscribed signals said, in order."""
    said: list[tuple[str, str, str, str]] = []

    def receiver(name: str):
        def hear(sender, mailing_list, address, source, **kwargs):
            said.append((name, mailing_list.key, address, source))
        return hear

    hear_out, hear_back = receiver("unsubscribed"), receiver("resubscribed")
    signals.unsubscribed.connect(hear_out, dispatch_uid="test-unsubscribed")
    signals.resubscribed.connect(hear_back, dispatch_uid="test-resubscribed")
    yield said
    signals.unsubscribed.disconnect(dispatch_uid="test-unsubscribed")
    signals.resubscribed.disconnect(dispatch_uid="test-resubscribed")


def path_of(token: str) -> str:
    return f"/kipekee/unsubscribe/{token}/"


def one_click(path: str, *, multipart: bool = False):
    """The mailbox provider's request: a fresh client (no cookies), CSRF checks on."""
    client = Client(enforce_csrf_checks=True)
    if multipart:
        return client.post(path, {"List-Unsubscribe": "One-Click"})  # multipart/form-data
    return client.post(path, "List-Unsubscribe=One-Click",
                       content_type="application/x-www-form-urlencoded")


def received_headers(sink, count: int = 1):
    return [message_from_bytes(m.data, policy=policy.default) for m in sink.wait_for(count)]


def token_in(header: str) -> str:
    url = header.split("<", 1)[1].split(">", 1)[0]
    assert url.startswith(f"{BASE_URL}/kipekee/unsubscribe/"), url
    return url.rsplit("/", 2)[1]


# --- RFC 8058: the one-click POST ------------------------------------------------------

def test_one_click_post_unsubscribes_without_cookies_or_csrf_token(newsletter, heard):
    token = lists.make_token("newsletter", "Ann <ANN@Example.com>")
    response = one_click(path_of(token))
    assert response.status_code == 200, response.content
    assert not response.cookies  # the endpoint sets none (no session, no CSRF cookie)
    [row] = Unsubscription.objects.all()
    assert (row.mailing_list_id, row.address, row.source) == ("newsletter", "ann@example.com",
                                                               "one-click")
    assert heard == [("unsubscribed", "newsletter", "ann@example.com", "one-click")]


def test_one_click_post_as_multipart_form_data(newsletter):
    response = one_click(path_of(lists.make_token("newsletter", "ann@example.com")),
                         multipart=True)
    assert response.status_code == 200
    assert Unsubscription.objects.filter(address="ann@example.com").exists()


def test_one_click_post_is_idempotent(newsletter, heard):
    path = path_of(lists.make_token("newsletter", "ann@example.com"))
    assert [one_click(path).status_code for _ in range(3)] == [200, 200, 200]
    assert Unsubscription.objects.count() == 1
    assert len(heard) == 1  # the signal says it once


@pytest.mark.parametrize("tamper", ["payload", "signature", "cut", "other-salt", "other-key"])
def test_a_tampered_token_gets_400_and_writes_nothing(newsletter, heard, tamper, settings):
    token = lists.make_token("newsletter", "ann@example.com")
    payload, timestamp, signature = token.rsplit(":", 2)
    if tamper == "payload":  # another address, the old signature
        other = signing.b64_encode(json.dumps(["newsletter", "bob@example.com"],
                                              separators=(",", ":")).encode()).decode()
        token = f"{other}:{timestamp}:{signature}"
    elif tamper == "signature":
        token = f"{payload}:{timestamp}:{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    elif tamper == "cut":
        token = token[:-5]
    elif tamper == "other-salt":  # a token of another part of the site
        token = signing.dumps(["newsletter", "ann@example.com"], salt="somewhere.else")
    else:
        settings.SECRET_KEY = "another-site"
        token = lists.make_token("newsletter", "ann@example.com")
        settings.SECRET_KEY = "kipekee-tests-only"
    for response in (one_click(path_of(token)), Client().get(path_of(token)),
                     Client().post(path_of(token), {"action": "unsubscribe"})):
        assert response.status_code == 400, (tamper, response.status_code)
    assert not Unsubscription.objects.exists()
    assert heard == []


def test_an_expired_token_gets_400_and_writes_nothing(newsletter, heard, kipekee_settings,
                                                       smtp_sink):
    # Tokens live 0.5 s here: a real wait, no clock faked.
    kipekee_settings({"UNSUBSCRIBE": {"BASE_URL": BASE_URL, "MAX_AGE_DAYS": 0.5 / 86400}},
                     primary=smtp_provider(smtp_sink))
    token = lists.make_token("newsletter", "ann@example.com")
    time.sleep(1.2)  # signing compares whole seconds
    response = one_click(path_of(token))
    assert response.status_code == 400
    assert b"expired" in response.content
    assert Client().get(path_of(token)).status_code == 400
    assert not Unsubscription.objects.exists() and heard == []
    with pytest.raises(InvalidToken, match="expired"):
        lists.read_token(token)


def test_a_post_without_the_one_click_body_or_an_action_is_400(newsletter):
    path = path_of(lists.make_token("newsletter", "ann@example.com"))
    response = Client().post(path, "List-Unsubscribe=Maybe",
                             content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400
    assert not Unsubscription.objects.exists()


def test_a_deleted_list_is_404_and_writes_nothing(newsletter):
    path = path_of(lists.make_token("promotions", "ann@example.com"))
    MailingList.objects.filter(key="promotions").delete()
    assert one_click(path).status_code == 404
    assert not Unsubscription.objects.exists()


def test_a_receiver_that_raises_does_not_undo_the_unsubscribe(newsletter, caplog):
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("CRM down")

    signals.unsubscribed.connect(broken, dispatch_uid="test-broken")
    try:
        response = one_click(path_of(lists.make_token("newsletter", "ann@example.com")))
    finally:
        signals.unsubscribed.disconnect(dispatch_uid="test-broken")
    assert response.status_code == 200
    assert Unsubscription.objects.filter(address="ann@example.com").exists()
    assert "CRM down" in caplog.text


# --- the page for people: GET confirms, nothing written; a way back ----------------------

def test_get_shows_a_confirmation_page_and_writes_nothing(newsletter, heard):
    path = path_of(lists.make_token("newsletter", "ann@example.com"))
    response = Client().get(path)
    assert response.status_code == 200
    page = response.content.decode()
    assert "Tours newsletter" in page and "ann@example.com" in page
    assert 'name="action" value="unsubscribe"' in page
    assert response["Referrer-Policy"] == "no-referrer"  # the token never leaks onwards
    assert "no-store" in response["Cache-Control"]
    assert not response.cookies
    assert not Unsubscription.objects.exists() and heard == []


def test_the_page_unsubscribes_and_offers_the_way_back(newsletter, heard):
    path = path_of(lists.make_token("newsletter", "ann@example.com"))
    client = Client(enforce_csrf_checks=True)
    response = client.post(path, {"action": "unsubscribe"})
    assert response.status_code == 303 and response["Location"].startswith(path)
    page = client.get(response["Location"]).content.decode()
    assert "unsubscribed" in page.lower()
    assert 'name="action" value="resubscribe"' in page
    assert Unsubscription.objects.get().source == "page"

    response = client.post(path, {"action": "resubscribe"})
    assert response.status_code == 303
    page = client.get(response["Location"]).content.decode()
    assert 'name="action" value="unsubscribe"' in page
    assert not Unsubscription.objects.exists()
    assert heard == [("unsubscribed", "newsletter", "ann@example.com", "page"),
                     ("resubscribed", "newsletter", "ann@example.com", "page")]


# --- the headers: list mail only -----------------------------------------------------------

def test_list_mail_carries_the_headers_and_transactional_mail_none(newsletter, sink):
    kipekee.send(subject="Your order", text="Thanks", to="ann@example.com")
    kipekee.send(subject="May news", text="Hello", to="Ann <ann@example.com>",
                 mailing_list="newsletter")
    order, news = received_headers(sink, 2)
    assert order["Subject"] == "Your order"
    for name in ("List-Unsubscribe", "List-Unsubscribe-Post", "List-Id"):
        assert name not in order
    assert news["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert news["List-Id"] == "<newsletter.shop.example>"
    https, mailto = [part.strip() for part in str(news["List-Unsubscribe"]).split(",")]
    token = token_in(https)
    assert mailto == f"<mailto:{MAILTO}?subject=unsubscribe%20{token}>"
    assert lists.read_token(token) == lists.Subscription("newsletter", "ann@example.com")
    # On the wire as written: folded between the links at most, never as encoded words
    # (=?utf-8?q?…?=, which Django 6's email policy makes of a URL longer than a line and
    # which no mail client reads as a link).
    raw = sink.messages[1].data.decode("ascii")
    block = raw.split("List-Unsubscribe:", 1)[1].split("List-Unsubscribe-Post:", 1)[0]
    assert "=?" not in block
    assert " ".join(block.split()) == f"{https}, {mailto}"
    # The received link works: one click and the next newsletter is not sent.
    assert one_click(path_of(token)).status_code == 200
    receipt = kipekee.send(subject="June news", text="Hello", to="ann@example.com",
                           mailing_list="newsletter")
    assert receipt.suppressed
    assert "unsubscribed from 'newsletter' (one-click)" in receipt.error


def test_templates_get_the_unsubscribe_url(newsletter, sink, tmp_path, settings):
    (tmp_path / "news.subject.txt").write_text("News")
    (tmp_path / "news.html").write_text('<p>Hi</p><a href="{{ unsubscribe_url }}">Unsubscribe</a>')
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [str(tmp_path)]}]
    kipekee.send("news", to="ann@example.com", mailing_list="newsletter")
    [message] = received_headers(sink)
    html = message.get_body(("html",)).get_content()
    assert f'href="{BASE_URL}/kipekee/unsubscribe/' in html
    assert token_in(str(message["List-Unsubscribe"])) in html


def test_without_mailto_only_the_https_link(newsletter, kipekee_settings, smtp_sink):
    kipekee_settings({"UNSUBSCRIBE": {"BASE_URL": BASE_URL}}, primary=smtp_provider(smtp_sink))
    kipekee.send(subject="News", text="x", to="ann@example.com", mailing_list="newsletter")
    [message] = received_headers(smtp_sink)
    # (The value may be folded onto the next line: leading white space is not part of it.)
    value = str(message["List-Unsubscribe"]).strip()
    assert "mailto:" not in value
    assert value.startswith(f"<{BASE_URL}/kipekee/unsubscribe/") and value.endswith("/>")
    # Folded where RFC 5322 allows: no line longer than 998 characters, the URL whole.
    raw = smtp_sink.messages[0].data
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert value[1:-1].encode() in raw


# --- per-list suppression ------------------------------------------------------------

def test_unsubscribed_from_one_list_still_gets_other_mail(newsletter, sink):
    lists.unsubscribe("newsletter", "Ann <ANN@Bücher.example>")
    assert Unsubscription.objects.get().address == "ann@xn--bcher-kva.example"
    news = kipekee.send(subject="News", text="x", to="ann@bücher.example",
                        mailing_list="newsletter")
    promo = kipekee.send(subject="Promo", text="x", to="ann@bücher.example",
                         mailing_list="promotions")
    order = kipekee.send(subject="Your order", text="x", to="ann@bücher.example")
    assert news.suppressed and news.refused
    assert promo.sent and order.sent
    assert [m.subject for m in sink.wait_for(2)] == ["Promo", "Your order"]
    assert suppression.check(["ann@bücher.example"]) == {}  # not on the global list


def test_unsubscribed_after_it_was_queued_is_not_sent(newsletter, sink):
    from kipekee.engines.worker import Worker

    receipt = kipekee.send(subject="News", text="x", to="ann@example.com",
                           mailing_list="newsletter", mode="queue")
    lists.unsubscribe("newsletter", "ann@example.com")
    Worker(once=True).run()
    row = OutboxEmail.objects.get(pk=receipt.id)
    assert row.status == Status.SUPPRESSED, row.last_error
    assert "unsubscribed from 'newsletter'" in row.refused["ann@example.com"]
    assert sink.messages == []


def test_a_list_message_goes_to_one_recipient(newsletter):
    for recipients in ({"to": ["a@example.com", "b@example.com"]},
                       {"to": "a@example.com", "bcc": "b@example.com"}):
        with pytest.raises(InvalidMessage, match="one recipient"):
            kipekee.send(subject="News", text="x", mailing_list="newsletter", **recipients)
    assert not OutboxEmail.objects.exists()


def test_an_unknown_list_is_refused_and_nothing_written(newsletter):
    with pytest.raises(UnknownMailingList, match="'newsleter'.*'newsletter'"):
        kipekee.send(subject="News", text="x", to="a@example.com", mailing_list="newsleter")
    assert not OutboxEmail.objects.exists()


def test_a_list_message_may_not_bring_its_own_unsubscribe_headers(newsletter):
    with pytest.raises(InvalidMessage, match="List-Unsubscribe"):
        kipekee.send(subject="News", text="x", to="a@example.com", mailing_list="newsletter",
                     headers={"List-Unsubscribe": "<https://elsewhere.example/u>"})
    assert not OutboxEmail.objects.exists()


def test_list_mail_without_a_base_url_is_a_configuration_error(newsletter, kipekee_settings,
                                                                 smtp_sink):
    kipekee_settings(primary=smtp_provider(smtp_sink))
    with pytest.raises(ConfigurationError, match="BASE_URL"):
        kipekee.send(subject="News", text="x", to="a@example.com", mailing_list="newsletter")
    assert not OutboxEmail.objects.exists()


def test_resend_takes_addresses_that_left_the_list_off(newsletter, sink):
    from kipekee import outbox

    receipt = kipekee.send(subject="News", text="x", to="ann@example.com",
                           mailing_list="newsletter")
    assert receipt.sent
    lists.unsubscribe("newsletter", "ann@example.com")
    with pytest.raises(InvalidMessage, match="unsubscribed from 'newsletter'"):
        outbox.resend(receipt.id)


def test_the_api_unsubscribe_and_resubscribe(newsletter, heard):
    row, created = lists.unsubscribe("newsletter", "Ann@Example.com")
    again, created_again = lists.unsubscribe("newsletter", "ann@example.com")
    assert created and not created_again and again.pk == row.pk
    assert lists.unsubscribed("newsletter", ["ANN@example.com", "bob@example.com"]) == {
        "ANN@example.com": lists.describe(row)}
    assert lists.resubscribe("newsletter", "ann@EXAMPLE.com") is True
    assert lists.resubscribe("newsletter", "ann@example.com") is False
    with pytest.raises(UnknownMailingList):
        lists.unsubscribe("nope", "ann@example.com")
    assert [h[0] for h in heard] == ["unsubscribed", "resubscribed"]


def test_a_list_with_unsubscriptions_cannot_be_deleted(newsletter):
    from django.db.models import ProtectedError

    lists.unsubscribe("newsletter", "ann@example.com")
    with pytest.raises(ProtectedError):
        newsletter.delete()
    with pytest.raises(IntegrityError):  # one row per mailbox and list
        Unsubscription.objects.create(mailing_list=newsletter, address="ANN@example.com")


# --- the mailto: link, through anymail's inbound webhook ------------------------------------

def postmark_inbound(to: str, subject: str) -> dict[str, Any]:
    """An inbound message as Postmark posts it (its documented inbound webhook JSON)."""
    return {
        "FromName": "Ann", "From": "ann@example.com",
        "FromFull": {"Email": "ann@example.com", "Name": "Ann", "MailboxHash": ""},
        "To": to, "ToFull": [{"Email": to, "Name": "", "MailboxHash": ""}],
        "Cc": "", "CcFull": [], "Bcc": "", "BccFull": [], "OriginalRecipient": to,
        "Subject": subject, "MessageID": "73e6d360-66eb-11e1-8e72-a8904824019b",
        "ReplyTo": "", "MailboxHash": "", "Date": "Fri, 1 May 2026 10:00:00 +0000",
        "TextBody": "", "HtmlBody": "", "StrippedTextReply": "", "Tag": "",
        "Headers": [{"Name": "Return-Path", "Value": "<ann@example.com>"}],
        "Attachments": [],
    }


def post_inbound(settings, body: dict[str, Any]) -> int:
    from anymail.webhooks.postmark import PostmarkInboundWebhookView

    settings.ANYMAIL = {"WEBHOOK_SECRET": "hook:secret"}
    request = RequestFactory().post(
        "/anymail/postmark/inbound/", json.dumps(body), content_type="application/json",
        HTTP_AUTHORIZATION="Basic " + base64.b64encode(b"hook:secret").decode())
    return PostmarkInboundWebhookView.as_view()(request).status_code


def test_the_mailto_link_unsubscribes_through_anymail_inbound(newsletter, sink, settings, heard):
    kipekee.send(subject="News", text="x", to="ann@example.com", mailing_list="newsletter")
    [message] = received_headers(sink)
    mailto = str(message["List-Unsubscribe"]).split(",")[1].strip()
    from urllib.parse import parse_qs, unquote, urlsplit

    link = urlsplit(mailto.strip("<>"))
    subject = parse_qs(link.query)["subject"][0]  # what the mail client puts in the subject
    assert unquote(link.path) == MAILTO and subject.startswith("unsubscribe ")
    assert post_inbound(settings, postmark_inbound(MAILTO, subject)) == 200
    assert Unsubscription.objects.get().source == "mailto"
    assert heard == [("unsubscribed", "newsletter", "ann@example.com", "mailto")]


def test_inbound_mail_that_is_not_an_unsubscribe_changes_nothing(newsletter, settings, caplog):
    token = lists.make_token("newsletter", "ann@example.com")
    # To another address: not ours, even with a valid token in it.
    assert post_inbound(settings, postmark_inbound("support@shop.example",
                                                   f"unsubscribe {token}")) == 200
    # To the unsubscribe address with a tampered token, or none.
    assert post_inbound(settings, postmark_inbound(MAILTO, f"unsubscribe {token[:-3]}xyz")) == 200
    assert post_inbound(settings, postmark_inbound(MAILTO, "please stop")) == 200
    assert not Unsubscription.objects.exists()
    assert "changed nothing" in caplog.text and "no token" in caplog.text


# --- the admin --------------------------------------------------------------------------

def test_admin_lists_and_unsubscriptions(admin_client, newsletter, heard):
    lists.unsubscribe("newsletter", "bob@example.com")
    page = admin_client.get("/admin/kipekee/mailinglist/")
    assert page.status_code == 200
    assert b"Tours newsletter" in page.content
    assert b"?mailing_list__key__exact=newsletter\">1</a>" in page.content
    lists.unsubscribe("promotions", "carol@example.com")
    filtered = admin_client.get("/admin/kipekee/unsubscription/",
                                {"mailing_list__key__exact": "newsletter"})
    assert filtered.status_code == 200
    assert b"bob@example.com" in filtered.content and b"carol@example.com" not in filtered.content
    change = admin_client.get(f"/admin/kipekee/mailinglist/{newsletter.pk}/change/")
    assert b'name="key"' not in change.content  # fixed once created

    # Added in the admin: in its canonical spelling, through kipekee.lists (a signal).
    added = admin_client.post("/admin/kipekee/unsubscription/add/",
                              {"mailing_list": "newsletter", "address": "Ann <ANN@Bücher.example>"})
    assert added.status_code == 302, added.content
    row = Unsubscription.objects.get(address="ann@xn--bcher-kva.example")
    assert row.source == "admin"
    again = admin_client.post("/admin/kipekee/unsubscription/add/",
                              {"mailing_list": "newsletter", "address": "ann@bücher.example"})
    assert again.status_code == 200 and b"already exists" in again.content

    found = admin_client.get("/admin/kipekee/unsubscription/", {"q": "ANN@Bücher.example"})
    assert b"ann@xn--bcher-kva.example" in found.content and b"bob@example.com" not in found.content

    # Deleting is resubscribing (Django's action, its confirmation page, then the POST).
    done = admin_client.post("/admin/kipekee/unsubscription/", {
        "action": "delete_selected", "_selected_action": [str(row.pk)], "post": "yes"})
    assert done.status_code == 302
    assert sorted(Unsubscription.objects.values_list("address", flat=True)) == [
        "bob@example.com", "carol@example.com"]
    assert heard[-2:] == [("unsubscribed", "newsletter", "ann@xn--bcher-kva.example", "admin"),
                          ("resubscribed", "newsletter", "ann@xn--bcher-kva.example", "admin")]


# --- settings and checks ---------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ({"BASE_URL": "shop.example"}, "BASE_URL"),
    ({"BASE_URL": "https://shop.example/?x=1"}, "BASE_URL"),
    ({"MAILTO": "not an address"}, "MAILTO"),
    ({"BASE_URL": "https://bücher.example"}, "xn--"),
    ({"MAILTO": "unsubscribe@bücher.example"}, "MAILTO"),
    ({"MAX_AGE_DAYS": 0}, "MAX_AGE_DAYS"),
    ({"URL": "https://shop.example"}, "keys among"),
])
def test_bad_unsubscribe_settings_say_what_is_wrong(value, message):
    from kipekee import conf

    with pytest.raises(ConfigurationError, match=message):
        conf.parse({"UNSUBSCRIBE": value})


@pytest.mark.parametrize("base_url, warned", [
    ("http://shop.example", True), ("https://shop.example", False),
    ("http://127.0.0.1:8000", False), (None, False)])
def test_a_base_url_that_is_not_https_is_a_warning(settings, base_url, warned):
    from kipekee.checks import check_settings

    settings.KIPEKEE = {"ENGINE": None, "UNSUBSCRIBE": {"BASE_URL": base_url} if base_url else {}}
    ids = [m.id for m in check_settings()]
    assert ("kipekee.W014" in ids) is warned
    assert conf_base(base_url) == (base_url.rstrip("/") if base_url else None)


def conf_base(base_url):
    from kipekee import conf

    return conf.parse({"UNSUBSCRIBE": {"BASE_URL": base_url + "/"} if base_url else {}}
                      ).unsubscribe.base_url


# --- lanes: list mail waits behind transactional mail -------------------------------------

def test_list_mail_waits_in_the_bulk_lane_unless_it_names_its_lane(newsletter, sink):
    order = kipekee.send(subject="Order", text="x", to="ann@example.com", mode="queue")
    news = kipekee.send(subject="News", text="x", to="ann@example.com",
                        mailing_list="newsletter", mode="queue")
    welcome = kipekee.send(subject="Welcome", text="x", to="bob@example.com",
                           mailing_list="newsletter", lane="transactional", mode="queue")
    lanes = dict(OutboxEmail.objects.values_list("pk", "lane"))
    assert (lanes[order.id], lanes[news.id], lanes[welcome.id]) == (
        "transactional", "bulk", "transactional")


def test_send_many_to_a_list(newsletter, sink, django_assert_max_num_queries):
    lists.unsubscribe("newsletter", "gone@example.com")
    people = [f"p{i}@example.com" for i in range(30)] + ["GONE@example.com"]

    def emails(count: int):
        return (kipekee.Email(subject="News", text="Leave: {{ unsubscribe_url }}", to=address,
                              mailing_list="newsletter") for address in people[:count])

    with django_assert_max_num_queries(12) as few:
        kipekee.send_many(emails(3))
    with django_assert_max_num_queries(len(few.captured_queries)):  # not one more for 10x
        receipts = kipekee.send_many(emails(31))
    assert [r.status for r in receipts[-2:]] == ["queued", "suppressed"]
    rows = OutboxEmail.objects.filter(pk__in=[r.id for r in receipts]).order_by("pk")
    assert {row.lane for row in rows} == {"bulk"}
    tokens = {lists.read_token(token_in(row.headers["List-Unsubscribe"])) for row in rows}
    assert len(tokens) == 31 and lists.Subscription("newsletter", "p7@example.com") in tokens
    with pytest.raises(UnknownMailingList, match="Message 1"):
        kipekee.send_many([kipekee.Email(subject="x", text="x", to="a@example.com"),
                           kipekee.Email(subject="x", text="x", to="b@example.com",
                                         mailing_list="nope")])
    assert OutboxEmail.objects.count() == 34


def test_a_notification_message_names_its_list(newsletter, sink):
    from kipekee.notifications import Message, register, unregister

    from .app.models import Quote

    register("test.news", Message("emails/quote_received", to=lambda q: q.email,
                                  mailing_list="newsletter"))
    try:
        quote = Quote.objects.create(name="Ann", email="ann@example.com", trip="Serengeti")
        [receipt] = kipekee.notify("test.news", quote)
        row = OutboxEmail.objects.get(pk=receipt.id)
        assert (row.lane, row.mailing_list) == ("bulk", "newsletter")
        assert row.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    finally:
        unregister("test.news")
