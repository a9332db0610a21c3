"""Django's own mail tests against Kipekee's backends: a gate for ``make test``.

    .venvs/django52/bin/python tests/django_gate/run.py [--keep-going] [-v]

With the Python of a virtualenv that has Kipekee and one Django installed, this

1. fetches the source distribution of exactly that Django version from PyPI
   (``pip download --no-binary :all:``) and unpacks its ``tests/`` into a cache
   (``.venvs/django-src/``, or ``$KIPEKEE_DJANGO_SRC``): fetched once per version;
2. runs Django's ``runtests.py`` twice:

   - ``smtp``: the SMTP-backend tests of ``tests/mail`` with Django's SMTP backend class
     replaced by ``kipekee.backends.smtp.EmailBackend``, nothing else changed;
   - ``dropin``: the backend-level tests (send_mail, send_mass_mail, mail_admins,
     mail_managers, EmailMessage.send, get_connection, the tests every backend shares)
     and the ``AdminEmailHandler`` and ``BrokenLinkEmailsMiddleware`` tests, with
     ``kipekee.backend.EmailBackend`` as the default backend (``kipekee_gate/dropin.py``);

3. compares each test's outcome with ``differences.toml``, the one list of Django tests
   that fail on purpose (each explained in the README, "Differences from Django's
   backends"). It exits non-zero when a test fails that is not listed, and when a listed
   test passes (the list must stay true).

Each run prints its pass counts and the time it took.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

import django

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DIFFERENCES = HERE / "differences.toml"

# Django's SMTP-backend test classes, by the module that holds them.
SMTP_LABELS = {
    (5, 2): ["mail.tests.SMTPBackendTests", "mail.tests.SMTPBackendStoppedServerTests"],
    (6, 0): ["mail.tests.SMTPBackendTests", "mail.tests.SMTPBackendStoppedServerTests"],
    (6, 1): ["mail.test_backends.SMTPBackendTests",
             "mail.test_backends.SMTPBackendStoppedServerTests"],
}


def django_tests(version: str) -> Path:
    """The ``tests/`` directory of Django ``version``'s source distribution (cached)."""
    cache = Path(os.environ.get("KIPEKEE_DJANGO_SRC", ROOT / ".venvs" / "django-src"))
    tests = cache / f"django-{version}" / "tests"
    if (tests / "runtests.py").exists():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", f"Django=={version}", "--dest", download],
            check=True,
        )
        [sdist] = Path(download).glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            prefix = archive.getnames()[0].split("/")[0] + "/tests/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = f"django-{version}/tests/" + member.name[len(prefix):]
            archive.extractall(cache, members=members, filter="data")
    return tests


def run(tests: Path, mode: str, labels: list[str], verbose: bool) -> dict[str, tuple[str, str]]:
    """Run Django's runtests.py on ``labels``; return each test's outcome and detail."""
    shutil.rmtree(tests / "kipekee_gate", ignore_errors=True)
    shutil.copytree(HERE / "kipekee_gate", tests / "kipekee_gate",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with tempfile.NamedTemporaryFile(suffix=".json") as results:
        env = {**os.environ, "KIPEKEE_GATE_RESULTS": results.name, "PYTHONWARNINGS": ""}
        completed = subprocess.run(
            [sys.executable, "kipekee_gate/launch.py", mode, "--settings=kipekee_gate.settings",
             "--parallel=1", f"--verbosity={2 if verbose else 0}", "--noinput", *labels],
            cwd=tests, env=env, capture_output=not verbose, text=True, check=False,
        )
        try:
            outcomes = json.loads(Path(results.name).read_text() or "{}")
        except json.JSONDecodeError:
            outcomes = {}
    if not outcomes:
        print(completed.stdout or "", completed.stderr or "", sep="\n")
        raise SystemExit(f"runtests.py ({mode}) ran no test (exit status {completed.returncode}).")
    return {test: tuple(value) for test, value in outcomes.items()}


def load_differences(version: tuple[int, int]) -> dict[str, str]:
    """The listed tests for this Django version: test id -> why it fails."""
    listed = tomllib.loads(DIFFERENCES.read_text())
    wanted = f"{version[0]}.{version[1]}"
    return {
        entry["test"]: f"{kind.replace('_', ' ')}: {entry['reason']}"
        for kind in ("difference", "not_applicable")
        for entry in listed.get(kind, [])
        if wanted in entry["django"]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="runtests.py at verbosity 2")
    parser.add_argument("--only", choices=["smtp", "dropin"], help="run one of the two")
    args = parser.parse_args()

    version = django.VERSION[:2]
    if version not in SMTP_LABELS:
        raise SystemExit(f"No gate for Django {django.get_version()} (add it to run.py).")
    tests = django_tests(django.get_version())
    differences = load_differences(version)
    runs = {"smtp": SMTP_LABELS[version], "dropin": ["kipekee_gate.dropin"]}

    status = 0
    for mode, labels in runs.items():
        if args.only and mode != args.only:
            continue
        started = time.monotonic()
        outcomes = run(tests, mode, labels, args.verbose)
        elapsed = time.monotonic() - started
        passed = [t for t, (o, _) in outcomes.items() if o in ("passed", "expected failure")]
        skipped = [t for t, (o, _) in outcomes.items() if o == "skipped"]
        failed = {t: d for t, (o, d) in outcomes.items()
                  if o not in ("passed", "skipped", "expected failure")}
        unlisted = {t: d for t, d in failed.items() if t not in differences}
        listed_failing = [t for t in failed if t in differences]
        now_passing = [t for t in passed if t in differences]
        print(f"Django {django.get_version()} {mode}: {len(passed)} passed, "
              f"{len(listed_failing)} listed, {len(unlisted)} unlisted failures, "
              f"{len(skipped)} skipped, of {len(outcomes)} ({elapsed:.1f} s)")
        for test in sorted(listed_failing):
            print(f"  listed: {test}: {differences[test].split(':')[0]}")
        for test in sorted(skipped):
            print(f"  skipped: {test}: {outcomes[test][1]}")
        for test, detail in sorted(unlisted.items()):
            print(f"  FAILED (not a listed difference): {test}\n{_indent(detail)}")
            status = 1
        for test in sorted(now_passing):
            print(f"  PASSES but is listed in {DIFFERENCES.name}: {test} (remove it there)")
            status = 1
    return status


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.strip().splitlines()[-25:])


if __name__ == "__main__":
    sys.exit(main())
