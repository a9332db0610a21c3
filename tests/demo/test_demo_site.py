"""End to end: the demo site in headless Chromium (Debian's), each flow read back in the
dev inbox page.

The site runs as ``manage.py kipekee_demo_serve`` in a subprocess (its own settings, a
fresh SQLite file, free ports for the site and both capture SMTP servers), exactly what
``make demo`` runs. Screenshots of the inbox and of one email go to ``artifacts/``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .demo_server import ROOT, Site, admin_styled, child_env, serve

playwright_sync = pytest.importorskip("playwright.sync_api")  # in the "test" extra
from playwright.sync_api import Browser, Page, expect  # noqa: E402

ARTIFACTS = ROOT / "artifacts"
# Submissions per client per form: enough for the quote tests, few enough to exceed.
RATE_LIMIT = 8
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The demo as `make demo` serves it (DEBUG on)."""
    with serve(tmp_path_factory.mktemp("demo"), KIPEKEE_DEMO_RATE_LIMIT=f"{RATE_LIMIT}/600") as site:
        yield site


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    context = browser.new_context(base_url=site.url)  # a fresh session per test
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def open_email(page: Page, subject: str, to: str, timeout: float = 20) -> None:
    """Open the newest message in the dev inbox with this subject and recipient, reloading
    until it arrives (engine-delivered mail comes a moment after the request)."""
    deadline = time.monotonic() + timeout
    while True:
        page.goto("/inbox/")
        rows = page.locator("#inbox tr", has_text=to).filter(has_text=subject)
        if rows.count():
            rows.first.locator("a").click()
            expect(page.locator("#subject")).to_contain_text(subject)
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"No {subject!r} to {to} in the inbox:\n{page.inner_text('#inbox')}")
        time.sleep(0.3)


def html_body(page: Page) -> str:
    return page.frame_locator("#html").locator("body").inner_text()


def fill(page: Page, **fields: str) -> None:
    for name, value in fields.items():
        page.fill(f"#id_{name}", value)


# --- The admin --------------------------------------------------------------------------

def test_admin_is_styled(page: Page) -> None:
    admin_styled(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-admin-login.png"), full_page=True)
    fill(page, username="admin", password="kipekee-demo")
    page.click("#login-form input[type=submit]")
    expect(page.locator("#site-name")).to_be_visible()
    page.goto("/admin/kipekee/outboxemail/")
    expect(page.locator("#changelist")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "demo-admin-outbox.png"), full_page=True)


def test_dev_inbox_says_it_is_open_because_debug_is_on(page: Page) -> None:
    page.goto("/inbox/")
    expect(page.locator("#access")).to_contain_text("Open to every visitor because DEBUG is on")
    expect(page.locator("#access")).to_contain_text("only to staff")


# --- Tours ----------------------------------------------------------------------------

def test_quote_request_reaches_office_and_customer(page: Page, site: Site) -> None:
    page.goto("/tours/")
    fill(page, name="Ann Traveller", email="ann@example.com", travellers="2",
         message="Vegetarian meals, please.")
    page.click("#quote-form button")
    expect(page.locator("#feedback")).to_contain_text("Your confirmation was sent to ann@example.com")

    # The office copy goes to the address fixed in settings, with Reply-To the customer.
    open_email(page, "New quote request from Ann Traveller", "office@tours.example")
    assert "Vegetarian meals, please." in html_body(page)
    expect(page.locator("#headers")).to_contain_text("ann@example.com")  # Reply-To

    open_email(page, "We received your quote request", "ann@example.com")
    assert "Thank you, Ann Traveller" in html_body(page)
    expect(page.locator("#text")).to_contain_text("for 2 travellers")
    expect(page.locator("#headers")).to_contain_text("Message-ID")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-email-quote.png"), full_page=True)
    page.goto("/inbox/")
    page.screenshot(path=str(ARTIFACTS / "demo-inbox.png"), full_page=True)


def test_refused_address_is_reported_on_the_success_page(page: Page) -> None:
    page.goto("/tours/")
    fill(page, name="Ref Used", email="refused@example.com", travellers="1")
    page.click("#quote-form button")
    feedback = page.locator("#feedback")
    expect(feedback).to_contain_text("the address refused@example.com was refused")
    expect(feedback).to_contain_text("550 5.1.1")


def test_confirmation_retried_while_both_servers_are_down(page: Page) -> None:
    page.goto("/inbox/")
    page.click("#toggle-primary")
    page.click("#toggle-backup")
    expect(page.locator("#server-backup")).to_have_text("down")
    try:
        page.goto("/tours/")
        fill(page, name="Rehema Retry", email="rehema@example.com", travellers="4")
        page.click("#quote-form button")
        expect(page.locator("#feedback")).to_contain_text("it will be retried")
    finally:
        page.goto("/inbox/")
        page.click("#toggle-primary")
        page.click("#toggle-backup")
        expect(page.locator("#server-backup")).to_have_text("up")
    # The engine retries it (demo RETRY: 2 s base, full jitter) once a server is back.
    open_email(page, "We received your quote request", "rehema@example.com", timeout=30)


def test_name_with_crlf_is_rejected_and_nothing_written(page: Page, site: Site) -> None:
    quotes = site.count("SELECT count(*) FROM shop_quoterequest")
    emails = site.count("SELECT count(*) FROM kipekee_outboxemail")
    page.goto("/tours/")
    fill(page, email="eve@example.com", travellers="1")
    # A text input drops line breaks, so send the form as a script would, with its token.
    status, body = page.evaluate("""async () => {
        const form = document.querySelector('#quote-form');
        const data = new FormData(form);
        data.set('name', 'Eve\\r\\nBcc: victim@example.com');
        const response = await fetch(form.action || location.href, {method: 'POST', body: data});
        return [response.status, await response.text()];
    }""")
    assert status == 200
    assert "A name must be one line" in body
    assert site.count("SELECT count(*) FROM shop_quoterequest") == quotes
    assert site.count("SELECT count(*) FROM kipekee_outboxemail") == emails


def test_honeypot_looks_like_success_and_writes_nothing(page: Page, site: Site) -> None:
    quotes = site.count("SELECT count(*) FROM shop_quoterequest")
    page.goto("/tours/")
    fill(page, name="Bot", email="bot@example.com", travellers="3")
    page.fill("#id_website", "http://spam.example", force=True)
    page.click("#quote-form button")
    expect(page.locator("h1")).to_have_text("Thank you")
    assert site.count("SELECT count(*) FROM shop_quoterequest") == quotes


def test_post_without_csrf_token_is_refused(page: Page, site: Site) -> None:
    response = page.request.post("/tours/", form={"name": "X", "email": "x@example.com",
                                                  "tour": "Zanzibar beaches", "travellers": "1"})
    assert response.status == 403
    assert site.count("SELECT count(*) FROM shop_quoterequest WHERE name = 'X'") == 0


def test_server_side_validation_messages(page: Page) -> None:
    page.goto("/tours/")
    fill(page, name="", email="not-an-address", travellers="0")
    page.click("#quote-form button")
    errors = page.locator(".errorlist")
    expect(errors.first).to_be_visible()
    text = page.inner_text("#quote-form")
    assert "This field is required." in text
    assert "Enter a valid email address." in text
    assert "greater than or equal to 1" in text


def test_job_application_with_cv_reaches_careers(page: Page, site: Site) -> None:
    page.goto("/tours/careers/")
    fill(page, name="Juma Guide", email="juma@example.com")
    page.set_input_files("#id_cv", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
    page.click("#careers-form button")
    expect(page.locator("#careers-form")).to_contain_text("The CV must be a PDF file.")

    fill(page, name="Juma Guide", email="juma@example.com")
    page.set_input_files("#id_cv", {"name": "juma-cv.pdf", "mimeType": "application/pdf", "buffer": PDF})
    page.click("#careers-form button")
    expect(page.locator(".flash")).to_contain_text("your application was sent to our careers team")

    open_email(page, "Application for Tour guide from Juma Guide", "careers@tours.example")
    attachment = page.locator("#attachments a", has_text="juma-cv.pdf")
    expect(attachment).to_be_visible()
    download = page.request.get(attachment.get_attribute("href") or "")
    assert download.body() == PDF


def test_newsletter_welcome_then_rate_limit(page: Page) -> None:
    page.goto("/tours/newsletter/")
    fill(page, email="Zawadi@Example.com")
    page.click("#newsletter-form button")
    expect(page.locator(".flash")).to_contain_text("Subscribed")
    open_email(page, "Welcome to our newsletter", "zawadi@example.com")

    # The limit is per client and counts every POST (RATE_LIMIT per 10 minutes here): a
    # script posting the form with its token gets 429 once past it.
    page.goto("/tours/newsletter/")
    statuses = page.evaluate("""async (count) => {
        const form = document.querySelector('#newsletter-form');
        const statuses = [];
        for (let i = 0; i < count; i++) {
            const data = new FormData(form);
            data.set('email', `flood${i}@example.com`);
            const response = await fetch(location.href, {method: 'POST', body: data, redirect: 'manual'});
            statuses.push(response.type === 'opaqueredirect' ? 302 : response.status);
        }
        return statuses;
    }""", RATE_LIMIT)
    assert statuses == [302] * (RATE_LIMIT - 1) + [429]  # the first POST above counted too
    fill(page, email="one-too-many@example.com")
    page.click("#newsletter-form button")
    expect(page.locator("#rate-limited")).to_contain_text(f"{RATE_LIMIT} submissions per client")


# --- Payments ---------------------------------------------------------------------------

def read_code(page: Page) -> str:
    open_email(page, "Your sign-in code", "admin@payments.example")
    match = re.search(r"Your sign-in code: (\d{6})", page.inner_text("#subject"))
    assert match, page.inner_text("#subject")
    return match.group(1)


def test_admin_sign_in_with_emailed_code_and_failover(page: Page) -> None:
    page.goto("/payments/")
    assert "/payments/login/" in page.url  # the dashboard needs the second factor
    fill(page, username="admin", password="kipekee-demo")
    page.click("#login-form button")
    expect(page.locator(".flash")).to_contain_text("A sign-in code was sent to admin@payments.example")
    code_page = page.url
    code = read_code(page)

    page.goto(code_page)
    wrong = "000000" if code != "000000" else "111111"
    fill(page, code=wrong)
    page.click("#code-form button")
    expect(page.locator("#code-form")).to_contain_text("Wrong code; 4 attempts left.")
    fill(page, code=code)
    page.click("#code-form button")
    expect(page.locator("h1")).to_have_text("Payments: notification service")

    # The notification service through the failover chain: primary, then backup.
    page.click("#notice-form button")
    expect(page.locator("#provider")).to_have_text("primary")
    page.click("#toggle-primary")
    expect(page.locator("#status-primary")).to_have_text("down")
    try:
        fill(page, subject="Payout batch 42 settled")
        page.click("#notice-form button")
        expect(page.locator("#result")).to_contain_text("sent")
        expect(page.locator("#provider")).to_have_text("backup")
    finally:
        page.goto("/payments/")
        page.click("#toggle-primary")
        expect(page.locator("#status-primary")).to_have_text("up")
    open_email(page, "Payout batch 42 settled", "ops@payments.example")
    expect(page.locator("body")).to_contain_text("Received by the backup server")


def test_code_expires_after_five_wrong_attempts(page: Page) -> None:
    page.goto("/payments/login/")
    fill(page, username="admin", password="kipekee-demo")
    page.click("#login-form button")
    code = read_code(page)
    wrong = "000000" if code != "000000" else "111111"
    page.goto("/payments/login/code/")
    bodies = page.evaluate("""async (wrong) => {
        const form = document.querySelector('#code-form');
        const bodies = [];
        for (let i = 0; i < 5; i++) {
            const data = new FormData(form);
            data.set('code', wrong);
            bodies.push(await (await fetch(location.href, {method: 'POST', body: data})).text());
        }
        return bodies;
    }""", wrong)
    assert "Wrong code; 0 attempts left." in bodies[-1]
    fill(page, code=code)  # the right code, too late
    page.click("#code-form button")
    expect(page.locator(".flash")).to_contain_text("tried too many times")
    assert "/payments/login/" in page.url and "code" not in page.url


# --- Marketplace ------------------------------------------------------------------------

def test_order_transitions_each_send_one_email_through_the_engine(page: Page, site: Site) -> None:
    page.goto("/market/")
    fill(page, customer_name="Neema", customer_email="neema@example.com", total="25.50")
    page.click("#order-form button")
    order = int(page.url.rstrip("/").rsplit("/", 1)[1])
    for action in ("accept", "pay", "deliver"):
        page.click(f"#action-{action}")
        expect(page.locator("#order-status")).to_be_visible()
    expect(page.locator("#order-status")).to_have_text("delivered")
    subjects = [f"Order #{order} received", f"Order #{order} accepted by the seller",
                f"Payment received for order #{order}", f"Order #{order} delivered"]
    open_email(page, subjects[-1], "neema@example.com")
    expect(page.locator("#html")).to_be_visible()
    page.goto("/inbox/")
    for subject in subjects:
        expect(page.locator("#inbox tr", has_text="neema@example.com").filter(has_text=subject)).to_have_count(1)
    # Written in mode "queue": the request only wrote the rows; the thread engine sent them.
    rows = site.rows("SELECT event, mode, status, attempts FROM kipekee_outboxemail "
                     "WHERE event LIKE ? AND object_id = ? ORDER BY id", "order.%", str(order))
    assert [r[0] for r in rows] == ["order.created", "order.accepted", "order.paid", "order.delivered"]
    assert {(r[1], r[2], r[3]) for r in rows} == {("queue", "sent", 1)}
    # A delivered order cannot be cancelled: the page offers no such action.
    page.goto(f"/market/orders/{order}/")
    expect(page.locator("#action-cancel")).to_have_count(0)


# --- Cinema -----------------------------------------------------------------------------

def test_booking_ticket_with_qr_and_reminder_fast_forward(page: Page) -> None:
    page.goto("/cinema/")
    page.select_option("#id_show", index=1)
    fill(page, name="Baraka", email="baraka@example.com", seat="F7")
    page.click("#booking-form button")
    expect(page.locator("#booking-status")).to_have_text("confirmed")
    booking_page = page.url
    reminder = page.locator("#rows tr", has_text="booking.reminder")
    expect(reminder).to_contain_text("queued")

    open_email(page, "Your ticket for", "baraka@example.com")
    expect(page.locator("#attachments")).to_contain_text("ticket-")
    expect(page.locator("#attachments")).to_contain_text("inline, cid:")
    qr = page.frame_locator("#html").locator("img[alt='Your ticket']")
    expect(qr).to_be_visible()
    assert qr.evaluate("img => img.complete && img.naturalWidth") > 0  # the cid: part loaded
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-email-ticket.png"), full_page=True)

    page.goto(booking_page)
    page.click("#fast-forward")
    expect(page.locator(".flash")).to_contain_text("the reminder is due now")
    open_email(page, "Reminder:", "baraka@example.com")
    expect(page.locator("#text")).to_contain_text("Seat F7")


def test_a_taken_seat_is_refused_with_a_message(page: Page, browser: Browser, site: Site) -> None:
    page.goto("/cinema/")
    page.select_option("#id_show", index=3)
    fill(page, name="First", email="first@example.com", seat="C3")
    page.click("#booking-form button")
    expect(page.locator("#booking-status")).to_have_text("confirmed")
    first = page.url

    other = browser.new_context(base_url=site.url).new_page()  # another customer
    try:
        other.goto("/cinema/")
        other.select_option("#id_show", index=3)
        fill(other, name="Second", email="second@example.com", seat="c3")
        other.click("#booking-form button")
        expect(other.locator("#booking-form .errorlist")).to_contain_text(
            "Seat C3 is already taken for this show")
        # Nor can it open the first customer's booking.
        assert other.goto(first).status == 404
    finally:
        other.context.close()
    assert site.count("SELECT count(*) FROM shop_booking WHERE email = 'second@example.com'") == 0
    assert site.count("SELECT count(*) FROM kipekee_outboxemail WHERE CAST(\"to\" AS TEXT) LIKE ?",
                      "%second@%") == 0


def test_declined_card_sends_payment_failed_and_no_reminder(page: Page) -> None:
    page.goto("/cinema/")
    page.select_option("#id_show", index=2)
    fill(page, name="Upendo", email="upendo@example.com", seat="B2")
    page.check("#id_card_declined")
    page.click("#booking-form button")
    expect(page.locator("#booking-status")).to_have_text("payment_failed")
    expect(page.locator("#rows")).not_to_contain_text("booking.reminder")
    open_email(page, "Payment failed for your booking", "upendo@example.com")
    expect(page.locator("#text")).to_contain_text("was declined")
    # The inbox after every flow, for a person to look at.
    page.goto("/inbox/")
    page.screenshot(path=str(ARTIFACTS / "demo-inbox-all-flows.png"), full_page=True)


# --- The one-shot script ----------------------------------------------------------------

def test_one_shot_demo_script(tmp_path: Path) -> None:
    env = child_env(KIPEKEE_DEMO_DATABASE=str(tmp_path / "script.sqlite3"))
    result = subprocess.run([sys.executable, "manage.py", "kipekee_demo"], cwd=ROOT / "demo",
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "after commit:" in result.stdout and "status=sent" in result.stdout
    assert "was refused (550 5.1.1 no such user here)" in result.stdout


