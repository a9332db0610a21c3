"""One headless Chromium for every browser test (the admin's and the demo site's).

Loaded by tests/conftest.py through ``pytest_plugins``. Debian's chromium
(scripts/ensure-chromium, run by ``make test``) driven by Playwright; the browser
Playwright would download is never used.

One session-wide instance, not one per module: Playwright's sync API refuses to start
while another instance's asyncio loop is running in the same thread, and pytest-django
reorders tests so that modules using the browser interleave.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright  # in the "test" extra

    # Playwright's sync API keeps an asyncio loop marked running in this thread, and
    # Django then refuses ORM calls from it. The tests' ORM calls are plain synchronous
    # code between browser calls (Playwright's own docs for Django say the same).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                 headless=True)
            yield browser
            browser.close()
    finally:
        if previous is None:
            del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous
