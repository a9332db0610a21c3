"""The outbox admin in headless Chromium: the list, the preview (no script runs, nothing
remote is fetched) and the retry action. Screenshots go to artifacts/ (gitignored).

The browser is tests/browser_fixtures.py's (Debian's chromium through Playwright).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.sync_api import Browser, Page, expect

from kipekee.models import Attachment, Attempt, OutboxEmail, Status

pytestmark = pytest.mark.django_db(transaction=True)

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
# A 1×1 PNG: the inline (cid:) image of the preview.
PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a6e3e6c90000000049454e44ae426082")


@pytest.fixture
def page(browser: Browser, live_server, django_user_model) -> Iterator[Page]:
    django_user_model.objects.create_superuser("ops", "ops@example.com", "correct horse")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(f"{live_server.url}/admin/login/?next=/admin/")
    page.fill("#id_username", "ops")
    page.fill("#id_password", "correct horse")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/admin/")
    yield page
    context.close()


class CountingServer:
    """A real HTTP server on 127.0.0.1 that counts the requests it gets."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                owner.paths.append(self.path)
                self.send_response(200)
                if self.path == "/control":
                    # An HTML page that asks for no favicon (which would count).
                    self.send_header("Content-Type", "text/html")
                    self.end_headers()
                    self.wfile.write(b'<!doctype html><link rel="icon" href="data:,">control')
                    return
                if self.path == "/refresh":
                    # A page without Kipekee's CSP that redirects itself at once.
                    self.send_header("Content-Type", "text/html")
                    self.end_headers()
                    self.wfile.write(b'<!doctype html><link rel="icon" href="data:,">'
                                     b'<meta http-equiv="refresh" content="0;url=/control">')
                    return
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(PIXEL)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def remote() -> Iterator[CountingServer]:
    server = CountingServer()
    yield server
    server.close()


def _row(**fields) -> OutboxEmail:
    now = timezone.now()
    values = {"from_email": "shop@example.com", "to": ["ann@example.com"], "subject": "Order 1",
              "body": "thanks", "message_id": f"<{now.timestamp()}@shop.example>",
              "created_at": now, "due_at": now, **fields}
    return OutboxEmail.objects.create(**values)


def test_list_shows_the_outbox(page: Page, live_server):
    statuses = [Status.SENT, Status.FAILED, Status.DEFERRED, Status.QUEUED, Status.SUPPRESSED,
                Status.CANCELLED]
    for i, status in enumerate(statuses * 4):
        _row(subject=f"Order {i} confirmed", to=[f"customer{i}@example.com"], status=status,
             sent_by="primary" if status == Status.SENT else "",
             last_error="550 5.1.1 no such user" if status == Status.FAILED else "")
    page.goto(f"{live_server.url}/admin/kipekee/outboxemail/")
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 24
    assert page.locator(".kipekee-status-failed").count() == 4
    assert page.locator(".kipekee-status-suppressed").count() == 4
    assert "550 5.1.1 no such user" in page.inner_text("#result_list")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin-outbox-list.png"), full_page=True)

    # expect() waits for the navigation the click or the Enter starts.
    page.click("#changelist-filter a[href*='status__exact=failed']")
    expect(page).to_have_url(re.compile(r"status__exact=failed"))
    expect(page.locator("#result_list tbody tr")).to_have_count(4)
    page.fill("#searchbar", "customer7@")
    page.press("#searchbar", "Enter")
    expect(page).to_have_url(re.compile(r"q=customer7"))
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    expect(page.locator("#result_list")).to_contain_text("Order 7 confirmed")


def test_preview_runs_no_script_and_loads_nothing_remote(page: Page, live_server, remote):
    # Control: the browser can reach the counting server, so "0 requests" below means
    # "blocked", not "unreachable".
    page.goto(f"{remote.url}/control")
    page.wait_for_load_state("networkidle")
    assert remote.paths == ["/control"]
    remote.paths.clear()

    html = f"""<html><head><link rel="stylesheet" href="{remote.url}/style.css">
      <style>h1 {{ color: #c62828 }}</style></head>
      <body><h1 id="greeting">Your ticket</h1>
      <img id="qr" src="cid:ticket-qr" alt="QR">
      <img id="pixel" src="{remote.url}/pixel.png" alt="tracking pixel">
      <script>document.title = "script ran"; new Image().src = "{remote.url}/from-script";
        fetch("{remote.url}/fetch");</script>
      <img src="x" onerror="document.title='handler ran'; new Image().src='{remote.url}/onerror'">
      </body></html>"""
    row = _row(subject="Your ticket", content_subtype="html", body=html, status=Status.SENT)
    Attachment.objects.create(email=row, filename="qr.png", mimetype="image/png", content=PIXEL,
                              content_id="ticket-qr")
    page.goto(f"{live_server.url}/admin/kipekee/outboxemail/{row.pk}/change/")
    iframe = page.locator("iframe.kipekee-preview")
    assert iframe.get_attribute("sandbox") == ""  # sandboxed, no allow-* at all
    frame = page.frame_locator("iframe.kipekee-preview")
    assert frame.locator("#greeting").inner_text() == "Your ticket"
    page.wait_for_load_state("networkidle")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin-outbox-preview.png"), full_page=True)

    # Opened alone (no sandbox, only the CSP): still nothing runs, nothing is fetched.
    preview = page.context.new_page()
    preview.goto(f"{live_server.url}/admin/kipekee/outboxemail/{row.pk}/preview/")
    preview.wait_for_load_state("networkidle")
    assert preview.title() == ""
    styles = preview.eval_on_selector("#greeting", "e => getComputedStyle(e).color")
    assert styles == "rgb(198, 40, 40)"  # inline styles are allowed
    assert preview.eval_on_selector("#qr", "e => e.naturalWidth") == 1  # cid: image shown
    assert preview.eval_on_selector("#pixel", "e => e.naturalWidth") == 0  # remote: blocked
    preview.close()
    assert remote.paths == []


def test_retry_action(page: Page, live_server):
    failed = _row(subject="Payment failed", status=Status.FAILED, attempts=3,
                  error_kind="transient", last_error="451 4.3.0 try later")
    sent = _row(subject="Welcome", status=Status.SENT, sent_by="primary")
    now = timezone.now()
    Attempt.objects.create(email=failed, number=3, provider="primary", started_at=now,
                           finished_at=now, outcome="transient", code=451,
                           error="451 4.3.0 try later")
    page.goto(f"{live_server.url}/admin/kipekee/outboxemail/")
    page.check(f"input.action-select[value='{failed.pk}']")
    page.check(f"input.action-select[value='{sent.pk}']")
    page.select_option("select[name=action]", "retry_selected")
    page.click("button[name=index]")
    expect(page.locator("ul.messagelist")).to_be_visible()
    messages = page.inner_text("ul.messagelist")
    assert "1 queued again: an engine sends them next." in messages
    assert "1 not retried (only failed or deferred messages can be)." in messages
    assert OutboxEmail.objects.get(pk=failed.pk).status == Status.QUEUED
    assert OutboxEmail.objects.get(pk=sent.pk).status == Status.SENT
    # The attempt and its error are on the change page.
    page.goto(f"{live_server.url}/admin/kipekee/outboxemail/{failed.pk}/change/")
    assert "451 4.3.0 try later" in page.inner_text("#attempt_log-group")
    # The change page's own button, posting through the (read-only) change form.
    page.click("button.kipekee-cancel")
    expect(page.locator("ul.messagelist")).to_contain_text("Cancelled.")
    assert OutboxEmail.objects.get(pk=failed.pk).status == Status.CANCELLED


def test_a_meta_refresh_in_a_mail_does_not_navigate_the_preview(page: Page, live_server,
                                                                 remote):
    """The preview opened alone is the admin's own top-level page: a mail's
    ``<meta http-equiv=refresh>`` must not take it (and the admin's browser) elsewhere."""
    # Control: the same meta refresh, without the preview's CSP, navigates.
    control = page.context.new_page()
    control.goto(f"{remote.url}/refresh")
    control.wait_for_url(f"{remote.url}/control")
    control.close()
    assert remote.paths == ["/refresh", "/control"]
    remote.paths.clear()

    html = (f'<html><head><meta http-equiv="refresh" content="0;url={remote.url}/control">'
            '</head><body><h1 id="greeting">Your ticket</h1>'
            '<img id="qr" src="cid:ticket-qr" alt="QR"></body></html>')
    row = _row(subject="Your ticket", content_subtype="html", body=html, status=Status.SENT)
    Attachment.objects.create(email=row, filename="qr.png", mimetype="image/png", content=PIXEL,
                              content_id="ticket-qr")
    url = f"{live_server.url}/admin/kipekee/outboxemail/{row.pk}/preview/"
    preview = page.context.new_page()
    preview.goto(url)
    preview.wait_for_load_state("networkidle")
    # Time for a zero-second refresh to happen (the control above took a few ms).
    preview.wait_for_timeout(1000)
    assert preview.url == url and remote.paths == []
    assert preview.eval_on_selector("#qr", "e => e.naturalWidth") == 1  # cid: image shown
    preview.close()
    # In the change page's iframe too.
    page.goto(f"{live_server.url}/admin/kipekee/outboxemail/{row.pk}/change/")
    frame = page.frame_locator("iframe.kipekee-preview")
    assert frame.locator("#greeting").inner_text() == "Your ticket"
    page.wait_for_timeout(1000)
    assert remote.paths == []


def test_sample_previews_in_the_browser(page: Page, live_server, remote, tmp_path, settings):
    """A registered notification's preview (HTML in the sandboxed frame, its inline QR
    code shown), a hostile template's preview (no script, nothing remote), a test send."""
    from kipekee import previews

    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [str(tmp_path)]}]
    (tmp_path / "hostile.subject.txt").write_text("Hostile")
    (tmp_path / "hostile.html").write_text(
        '<h1 id="h">{{ name }}</h1><img id="pixel" src="{{ remote }}/pixel.png">'
        '<script>document.title = "script ran"; fetch("{{ remote }}/fetch");</script>')
    previews.register_template("hostile", sample=lambda: {"name": "Hi", "remote": remote.url})
    try:
        page.goto(f"{live_server.url}/admin/kipekee/outboxemail/")
        page.click("#kipekee-previews-link")
        page.click("a:text-is('notification/booking.confirmed/customer')")
        expect(page.locator("#kipekee-subject")).to_have_text("Your ticket B-1001")
        frame = page.frame_locator("iframe.kipekee-preview")
        expect(frame.locator("body")).to_contain_text("Queen of Katwe")
        expect(frame.locator("body")).to_contain_text("Seat F7")
        qr = frame.locator("img[alt='Your ticket']")
        expect(qr).to_be_visible()
        assert qr.evaluate("e => e.naturalWidth") > 0  # the cid: image, as data:
        assert "ticket-B-1001.png" in page.inner_text("#kipekee-attachments")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "admin-sample-preview.png"), full_page=True)

        page.fill("#id_to", "designer@example.com")
        page.click("#kipekee-test-send input[type=submit]")
        expect(page.locator("ul.messagelist")).to_contain_text("Test queued as #")
        row = OutboxEmail.objects.get(to=["designer@example.com"])
        assert row.subject.startswith("[Test] Your ticket")

        page.goto(f"{live_server.url}/admin/kipekee/outboxemail/previews/show/template/hostile")
        expect(page.frame_locator("iframe.kipekee-preview").locator("#h")).to_have_text("Hi")
        page.wait_for_load_state("networkidle")
        alone = page.context.new_page()
        alone.goto(f"{live_server.url}/admin/kipekee/outboxemail/previews/frame/template/hostile")
        alone.wait_for_load_state("networkidle")
        assert alone.title() == ""
        assert alone.eval_on_selector("#pixel", "e => e.naturalWidth") == 0
        alone.close()
        assert remote.paths == []
    finally:
        previews.unregister_template("hostile")
