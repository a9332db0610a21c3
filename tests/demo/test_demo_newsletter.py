"""The tours newsletter in the demo, end to end in headless Chromium: issues go out as list
mail (bulk lane, one-click unsubscribe headers), the dev inbox shows the headers, a
person unsubscribes from the received mail's link and sees the confirmation (and the
way back), a mailbox provider's one-click POST works without cookies, the ``mailto:``
link's email works, and who left gets no issue while their order mail still comes.

Its own demo server: the other module's rate-limit budget for the newsletter form is
spent by a test there. ``manage.py kipekee_render`` over the demo's notifications and
templates runs here too (every one must render: it is the demo's CI check).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from .demo_server import ROOT, Site, child_env, serve

playwright_sync = pytest.importorskip("playwright.sync_api")  # in the "test" extra
from playwright.sync_api import Browser, Page, expect  # noqa: E402

from .test_demo_site import ARTIFACTS, fill, open_email  # noqa: E402

NEWS = "Kipekee Tours newsletter"
PEOPLE = ("imani@example.com", "baraka@example.com", "neema@example.com")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with serve(tmp_path_factory.mktemp("demo-newsletter"),
               KIPEKEE_DEMO_RATE_LIMIT="20/600") as site:
        yield site


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    context = browser.new_context(base_url=site.url)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def send_issue(page: Page, title: str) -> str:
    page.goto("/tours/newsletter/")
    fill(page, title=title)
    page.click("#issue-form button")
    flash = page.locator(".flash")
    expect(flash).to_contain_text(f"Issue “{title}” queued")
    return flash.inner_text()


def left(site: Site) -> dict[str, str]:
    return dict(site.rows("SELECT address, source FROM kipekee_unsubscription"))


def wait_until(check, what: str, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_newsletter_issue_with_one_click_unsubscribe(page: Page, site: Site) -> None:
    for address in PEOPLE:
        page.goto("/tours/newsletter/")
        fill(page, email=address)
        page.click("#newsletter-form button")
        expect(page.locator(".flash")).to_contain_text("Subscribed")
    # The welcome mail is list mail too: its footer and headers offer the way out.
    open_email(page, "Welcome to our newsletter", PEOPLE[0])
    expect(page.locator("#list-unsubscribe")).to_be_visible()

    assert "queued for 3 subscriber(s); 0 left" in send_issue(page, "The great migration is on")
    issue = "The great migration is on · Kipekee Tours"

    # The dev inbox shows the headers a mailbox provider reads.
    open_email(page, issue, PEOPLE[0])
    headers = page.inner_text("#headers")
    assert "List-Unsubscribe-Post" in headers and "List-Unsubscribe=One-Click" in headers
    assert "/kipekee/unsubscribe/" in headers and "mailto:unsubscribe@kipekee.example" in headers
    assert "List-Id" in headers
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-newsletter-issue.png"), full_page=True)

    # 1. A person: the mail's unsubscribe link, a confirmation page, one button.
    page.click("#unsubscribe-link")
    expect(page.locator("#state")).to_have_text(f"Unsubscribe from {NEWS}?")
    expect(page.locator("#unsubscribe")).to_contain_text(PEOPLE[0])
    assert left(site) == {}  # opening the link (a GET, as link scanners do) changes nothing
    unsubscribe_page = page.url
    page.click("#confirm")
    expect(page.locator("#state")).to_have_text("You are unsubscribed")
    expect(page.locator("#unsubscribe")).to_contain_text(f"will no longer receive {NEWS}")
    expect(page.locator("#resubscribe")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "demo-newsletter-unsubscribed.png"), full_page=True)
    assert left(site) == {PEOPLE[0]: "page"}

    # 2. A mailbox provider: RFC 8058's POST, without cookies, without a CSRF token.
    open_email(page, issue, PEOPLE[1])
    link = page.get_attribute("#unsubscribe-link", "href") or ""
    path = urllib.parse.urlsplit(link).path
    provider = site.visitor()  # a fresh client: no cookie at all
    for _ in range(2):  # idempotent
        answer = provider.request(path, b"List-Unsubscribe=One-Click",
                                  "application/x-www-form-urlencoded")
        assert answer.status == 200, answer.body
        assert not answer.cookies
    assert left(site)[PEOPLE[1]] == "one-click"
    # A tampered link: 400, nothing written.
    tampered = provider.request(path[:-4] + "xyz/", b"List-Unsubscribe=One-Click",
                                "application/x-www-form-urlencoded")
    assert tampered.status == 400
    assert len(left(site)) == 2

    # 3. The mailto: link: the email a mail client sends, through the capture servers.
    open_email(page, issue, PEOPLE[2])
    page.click("#mailto-form button")
    expect(page.locator(".flash")).to_contain_text("to unsubscribe@kipekee.example")
    wait_until(lambda: left(site).get(PEOPLE[2]) == "mailto", "the mailto unsubscribe")

    # The next issue reaches nobody; their order mail still comes, without the headers.
    assert "queued for 0 subscriber(s); 3 left the list" in send_issue(page, "Zanzibar in June")
    page.goto("/market/")
    fill(page, customer_name="Imani", customer_email=PEOPLE[0], total="40.00")
    page.click("#order-form button")
    order = int(page.url.rstrip("/").rsplit("/", 1)[1])
    open_email(page, f"Order #{order} received", PEOPLE[0])
    expect(page.locator("#list-unsubscribe")).to_have_count(0)
    assert "List-Unsubscribe" not in page.inner_text("#headers")

    # The way back: the same page, resubscribe; the next issue reaches Imani again.
    page.goto(unsubscribe_page)
    page.click("#resubscribe")
    expect(page.locator("#state")).to_have_text("You are subscribed again")
    assert PEOPLE[0] not in left(site)
    send_issue(page, "Kilimanjaro in September")
    open_email(page, "Kilimanjaro in September · Kipekee Tours", PEOPLE[0])

    issues = site.rows(
        "SELECT subject, status, mailing_list, lane FROM kipekee_outboxemail "
        "WHERE template = 'emails/newsletter_issue' ORDER BY id")
    by_issue: dict[str, list[str]] = {}
    for subject, status, mailing_list, lane in issues:
        assert (mailing_list, lane) == ("tours-news", "bulk")
        by_issue.setdefault(subject.split(" · ")[0], []).append(status)
    assert by_issue["Zanzibar in June"] == ["suppressed"] * 3
    assert sorted(by_issue["Kilimanjaro in September"])[-1] == "suppressed"
    # The welcome mail names the list too, but the subscriber waits for it.
    assert {lane for (lane,) in site.rows(
        "SELECT lane FROM kipekee_outboxemail WHERE template = 'emails/welcome'")} == {
        "transactional"}


def test_the_issue_desk_is_staff_only_with_debug_off(tmp_path: pytest.TempPathFactory) -> None:
    """With DEBUG off an anonymous visitor sees no desk and cannot post an issue."""
    with serve(tmp_path, KIPEKEE_DEMO_DEBUG="0") as site:  # type: ignore[arg-type]
        visitor = site.visitor()
        page = visitor.get("/tours/newsletter/")
        assert page.status == 200 and "issue-form" not in page.body
        fields = visitor.hidden("/tours/newsletter/", "newsletter-form")
        answer = visitor.post("/tours/newsletter/issues/", {
            "csrfmiddlewaretoken": fields["csrfmiddlewaretoken"], "title": "Spam"})
        assert answer.status == 302 and "/admin/login/" in answer.location
        assert site.count("SELECT count(*) FROM shop_newsletterissue") == 0


def test_every_demo_email_renders_with_its_sample(tmp_path: pytest.TempPathFactory) -> None:
    """``manage.py kipekee_render --require-samples`` over the demo: every registered
    notification and every email template renders (a template error fails this)."""
    env = child_env(KIPEKEE_DEMO_DATABASE=str(tmp_path / "render.sqlite3"))  # type: ignore[operator]
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT / "demo", env=env,
                   check=True)
    result = subprocess.run([sys.executable, "manage.py", "kipekee_render", "--require-samples"],
                            cwd=ROOT / "demo", env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "16 of 16 rendered." in result.stdout
    assert "notification/newsletter.subscribed/welcome" in result.stdout
    assert "template/emails/newsletter_issue" in result.stdout
