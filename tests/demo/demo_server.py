"""The demo site as its tests run it: ``manage.py kipekee_demo_serve`` in a subprocess
(its own settings, a fresh database, free ports for the site and both capture SMTP
servers), exactly what ``make demo`` runs; and :class:`Visitor`, one client's cookies
over plain HTTP, for the tests that act as a script (or an attacker) would.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parents[2]

# The PostgreSQL pass of `make test` runs the same demo the way the README switches it:
# PostgreSQL (a database of its own) and `manage.py kipekee_worker` beside the site.
ON_POSTGRES = os.environ.get("KIPEKEE_TEST_DATABASE") == "postgres"
PG_USER = os.environ.get("KIPEKEE_PG_USER", "postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The demo's own environment: this process's, without the switch the browser
    fixture sets for the test process only (the site must keep Django's async check)."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    return {**env, "DJANGO_SETTINGS_MODULE": "demo_site.settings", **extra}


class Site:
    def __init__(self, url: str, database: str) -> None:
        self.url = url
        self.database = database  # a SQLite path or a postgres:// URL

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.database.startswith("postgres://"):
            import psycopg

            with psycopg.connect(self.database) as conn:
                return conn.execute(sql.replace("?", "%s"), params).fetchall()
        with sqlite3.connect(self.database) as conn:
            return conn.execute(sql, params).fetchall()

    def count(self, sql: str, *params: Any) -> int:
        return self.rows(sql, *params)[0][0]

    def visitor(self) -> Visitor:
        return Visitor(self.url)


_databases = itertools.count()


@contextlib.contextmanager
def database(tmp: Path) -> Iterator[str]:
    if not ON_POSTGRES:
        yield str(tmp / "demo.sqlite3")
        return
    import psycopg

    name = f"kipekee_demo_test_{os.getpid()}_{next(_databases)}"
    admin = f"postgres://{PG_USER}@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgres://{PG_USER}@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start(args: list[str], env: dict[str, str], log: IO[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT / "demo", env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _answers(server: subprocess.Popen[str], url: str, log: IO[str], *, retry: bool) -> bool:
    """Wait until the demo site answers at ``url``. False: it could not bind one of its
    ports (taken by another process since :func:`free_port`), and ``retry`` allows
    another try; it is stopped and its log kept. Fails the test if it did not start."""
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=2).close()
        except OSError:
            pass
        else:
            if server.poll() is None:  # (not another process's server on that port)
                return True
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            log.seek(0)
            output = log.read()
            if retry and server.returncode is not None and "in use" in output:
                log.write("\n(ports taken: trying again on others)\n")
                return False
            pytest.fail(f"The demo server did not start:\n{output}")
        time.sleep(0.2)


@contextlib.contextmanager
def serve(tmp: Path, **settings: str) -> Iterator[Site]:
    """The demo site on free ports with a fresh database; ``settings`` are its
    ``KIPEKEE_DEMO_*`` environment. Fails the test run if any request logged a traceback
    (a server error is a failure even if the page looked right)."""
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(database(tmp))
        log = (tmp / "demo-server.log").open("w+")
        stack.callback(log.close)  # last: the processes stop first
        for tries_left in reversed(range(3)):
            # Fixed ports (not 0): a worker process must reach the same capture servers.
            # free_port() lets a port go before the site binds it: another test run on
            # the machine may take it meanwhile, and then the site is tried on new ports.
            port = free_port()
            env = child_env(KIPEKEE_DEMO_DATABASE=db,
                            KIPEKEE_DEMO_ENGINE="worker" if ON_POSTGRES else "thread",
                            KIPEKEE_DEMO_SMTP_PORT=str(free_port()),
                            KIPEKEE_DEMO_BACKUP_SMTP_PORT=str(free_port()),
                            KIPEKEE_DEMO_FAST_PASSWORDS="1", PYTHONUNBUFFERED="1", **settings)
            log.seek(0, os.SEEK_END)
            this_try = log.tell()  # (a try that could not bind may have logged a traceback)
            server = start(["kipekee_demo_serve", "--addrport", f"127.0.0.1:{port}"], env, log)
            url = f"http://127.0.0.1:{port}"
            if _answers(server, url, log, retry=tries_left > 0):
                break
        stack.callback(stop, server)
        processes = [server]
        if ON_POSTGRES:  # after the site has migrated
            processes.append(start(["kipekee_worker", "--poll-interval", "0.5"], env, log))
            stack.callback(stop, processes[-1])
        yield Site(url, db)
        for process in processes:  # (stopping twice is harmless)
            stop(process)
        log.seek(this_try)
        output = log.read()
    assert "Traceback" not in output, output


# --- A client over plain HTTP ---------------------------------------------------------

@dataclass(frozen=True)
class Response:
    status: int
    body: str
    location: str  # the Location header of a redirect, "" otherwise
    cookies: Mapping[str, str]  # the cookies this response set

    @property
    def form_error(self) -> bool:
        return self.status == 200 and 'class="errorlist' in self.body


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx comes back to the caller as it is


class _Inputs(HTMLParser):
    """The hidden inputs of one ``<form id=...>`` (its CSRF token, its submission key)."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id = form_id
        self.inside = False
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.inside = attributes.get("id") == self.form_id
        elif tag == "input" and self.inside and attributes.get("type") == "hidden":
            self.fields[attributes.get("name") or ""] = attributes.get("value") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False


class Visitor:
    """One browser's cookies, driven as a script would: pages fetched and forms posted
    over plain HTTP, redirects not followed. Safe to share between threads (the cookie
    jar locks); :meth:`clone` gives a second client holding the same cookies."""

    def __init__(self, url: str, jar: CookieJar | None = None) -> None:
        self.url = url
        self.jar = jar if jar is not None else CookieJar()
        self._opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                   _NoRedirects())

    def clone(self) -> Visitor:
        jar = CookieJar()
        for cookie in self.jar:
            jar.set_cookie(cookie)
        return Visitor(self.url, jar)

    def request(self, path: str, data: bytes | None = None, content_type: str = "") -> Response:
        request = urllib.request.Request(self.url + path, data=data)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with self._opener.open(request, timeout=30) as answer:
                return self._response(answer.status, answer.headers, answer.read())
        except urllib.error.HTTPError as error:
            return self._response(error.code, error.headers, error.read())

    @staticmethod
    def _response(status: int, headers: http.client.HTTPMessage, body: bytes) -> Response:
        cookies = {}
        for header in headers.get_all("Set-Cookie") or []:
            name, _, rest = header.partition("=")
            cookies[name.strip()] = rest.split(";", 1)[0]
        return Response(status, body.decode("utf-8", "replace"), headers.get("Location") or "",
                        cookies)

    def get(self, path: str) -> Response:
        return self.request(path)

    def hidden(self, path: str, form_id: str) -> dict[str, str]:
        """GET ``path``; the hidden fields of its form ``form_id``, as a browser would send them."""
        page = self.get(path)
        assert page.status == 200, (path, page.status, page.body[:500])
        parser = _Inputs(form_id)
        parser.feed(page.body)
        assert "csrfmiddlewaretoken" in parser.fields, f"no form #{form_id} on {path}"
        return parser.fields

    def post(self, path: str, fields: Mapping[str, str],
             files: Mapping[str, tuple[str, bytes, str]] | None = None) -> Response:
        """POST ``fields`` (urlencoded, or multipart with ``files``: name → (filename,
        content, type))."""
        if not files:
            return self.request(path, urllib.parse.urlencode(fields).encode(),
                                "application/x-www-form-urlencoded")
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                         .encode() + value.encode() + b"\r\n")
        for name, (filename, content, mimetype) in files.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                         f'filename="{filename}"\r\nContent-Type: {mimetype}\r\n\r\n'.encode()
                         + content + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return self.request(path, body, f"multipart/form-data; boundary={boundary}")

    def submit(self, path: str, form_id: str, fields: Mapping[str, str],
               files: Mapping[str, tuple[str, bytes, str]] | None = None) -> Response:
        """Fill in the form ``form_id`` of ``path`` (its hidden fields as served) and POST it."""
        return self.post(path, {**self.hidden(path, form_id), **fields}, files)


# --- In the browser ---------------------------------------------------------------------

def admin_styled(page: Page) -> None:
    """Open the admin's sign-in page: every stylesheet it links answered 200 and applied."""
    answers: dict[str, int] = {}
    page.on("response", lambda r: answers.__setitem__(r.url, r.status)
            if r.request.resource_type == "stylesheet" else None)
    page.goto("/admin/login/")
    page.wait_for_load_state("load")
    linked = page.eval_on_selector_all("link[rel=stylesheet]", "links => links.map(l => l.href)")
    assert len(linked) >= 3, linked
    assert {url: answers.get(url) for url in linked} == {url: 200 for url in linked}
    # Applied: each sheet parsed with rules, and the admin's header has its colours.
    rules = page.evaluate("() => [...document.styleSheets].map(s => s.cssRules.length)")
    assert len(rules) == len(linked) and all(rules), rules
    header = page.evaluate("() => getComputedStyle(document.querySelector('#header')).backgroundColor")
    assert header not in ("", "rgba(0, 0, 0, 0)", "transparent"), header
