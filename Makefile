# The two commands of the README:
#   make demo   the demo site (four seed systems, dev inbox) on http://127.0.0.1:8000/
#               (make demo-script: the one-shot version that prints outbox rows)
#   make test   the static checks (make lint: ruff, mypy --strict, the layer contract), then
#               the whole test suite on Django 5.2 LTS (Python 3.11), 6.0 and 6.1 (Python 3.13),
#               on SQLite, each with Django's own mail tests against Kipekee's backends
#               (tests/django_gate), then on Django 5.2 against PostgreSQL at 127.0.0.1:5432
#               (where the multi-process worker tests run)
#   make bench  Kipekee against smtplib, Django's SMTP backend and django-post-office on
#               one machine, workload and sink (bench/compare.py; BENCH_ARGS=... for flags);
#               writes bench/COMPARISON.md
#   make bench-latency  one send in the request with the provider 20 ms away: Django's send_mail
#               against kipekee.send now/hybrid/queue, cold and warm, SMTP and HTTP
#               (bench/latency.py; BENCH_ARGS=... for flags); writes bench/LATENCY.md
#   make bench-soak  the random-fault soak of issue 17 at N = 10,000 on PostgreSQL
#               (bench/soak.py; BENCH_ARGS=... for flags: --seed, --n, --sqlite)
#   make bench-scale  provider limits shared by 4 workers + 2 web processes (database, then
#               Redis store) and 8 workers on two host names against one, on PostgreSQL
#               (bench/scale.py; database kipekee_scale, createdb it first; BENCH_ARGS=...)
# Each builds its own virtualenv under .venvs/ from scratch on first use.

SHELL := /bin/bash
VENVS := .venvs

.PHONY: lint demo demo-script test test-django52 test-django60 test-django61 test-postgres clean \
	chromium bench bench-latency bench-soak bench-scale

$(VENVS)/django52/.installed: pyproject.toml
	rm -rf $(VENVS)/django52
	"$$(scripts/python-for 3.11)" -m venv $(VENVS)/django52
	$(VENVS)/django52/bin/pip install -q --upgrade pip
	$(VENVS)/django52/bin/pip install -q -e '.[test,lint]' 'Django>=5.2,<5.3'
	touch $@

# Django 6.x on Python 3.13: its mail tests import email.errors.HeaderWriteError, which
# this machine's Python 3.12.1 lacks (added in 3.12.5 / 3.13).
$(VENVS)/django60/.installed: pyproject.toml
	rm -rf $(VENVS)/django60
	"$$(scripts/python-for 3.13)" -m venv $(VENVS)/django60
	$(VENVS)/django60/bin/pip install -q --upgrade pip
	$(VENVS)/django60/bin/pip install -q -e '.[test]' 'Django>=6.0,<6.1'
	touch $@

$(VENVS)/django61/.installed: pyproject.toml
	rm -rf $(VENVS)/django61
	"$$(scripts/python-for 3.13)" -m venv $(VENVS)/django61
	$(VENVS)/django61/bin/pip install -q --upgrade pip
	$(VENVS)/django61/bin/pip install -q -e '.[test]' 'Django>=6.1,<6.2'
	touch $@

# The benchmark's own venv: Kipekee plus the references it is compared with.
$(VENVS)/bench/.installed: pyproject.toml bench/requirements.txt
	rm -rf $(VENVS)/bench
	"$$(scripts/python-for 3.11)" -m venv $(VENVS)/bench
	$(VENVS)/bench/bin/pip install -q --upgrade pip
	$(VENVS)/bench/bin/pip install -q -e '.[test,postgres]' -r bench/requirements.txt
	touch $@

bench: $(VENVS)/bench/.installed
	KIPEKEE_BENCH_MAKE=1 $(VENVS)/bench/bin/python bench/compare.py $(BENCH_ARGS)

bench-latency: $(VENVS)/bench/.installed
	KIPEKEE_BENCH_MAKE=1 $(VENVS)/bench/bin/python bench/latency.py $(BENCH_ARGS)

bench-soak: $(VENVS)/django52/.installed
	$(VENVS)/django52/bin/python bench/soak.py $(BENCH_ARGS)
bench-scale: $(VENVS)/django52/.installed
	$(VENVS)/django52/bin/python bench/scale.py $(BENCH_ARGS)

demo: $(VENVS)/django52/.installed
	cd demo && ../$(VENVS)/django52/bin/python manage.py kipekee_demo_serve

demo-script: $(VENVS)/django52/.installed
	cd demo && ../$(VENVS)/django52/bin/python manage.py kipekee_demo
	cd demo && ../$(VENVS)/django52/bin/python manage.py kipekee_demo_mailtrap

# The browser tests need Debian's chromium; installed here when missing.
chromium:
	scripts/ensure-chromium

# Django's own mail tests against Kipekee's backends, for the venv's Django version
# (fetches that Django's source distribution once, into .venvs/django-src/).
django-gate-%: $(VENVS)/%/.installed
	$(VENVS)/$*/bin/python tests/django_gate/run.py

# pytest-xdist workers per pass: the suite mostly waits (servers, engines, subprocesses;
# one process keeps a core about 40% busy), so two workers halve a pass on two cores.
# Every worker has its own test database (named by its pid in tests/settings.py) and its
# own Redis key prefixes. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
PYTEST := -m pytest -n $(PYTEST_WORKERS)

# The suite, then the gate; both always run, the target fails if either failed.
test-django52 test-django60 test-django61: test-%: $(VENVS)/%/.installed chromium
	@status=0; \
	$(VENVS)/$*/bin/python $(PYTEST) $(PYTEST_ARGS) || status=1; \
	$(MAKE) --no-print-directory django-gate-$* || status=1; \
	exit $$status

test-postgres: $(VENVS)/django52/.installed chromium
	KIPEKEE_TEST_DATABASE=postgres $(VENVS)/django52/bin/python $(PYTEST) $(PYTEST_ARGS)

# The static checks, in seconds (mypy keeps its cache in .mypy_cache): ruff (rules in
# pyproject), mypy --strict with django-stubs on src/kipekee, and the layer contract
# (import-linter, [tool.importlinter] in pyproject).
lint: $(VENVS)/django52/.installed
	@status=0; \
	$(VENVS)/django52/bin/ruff check src || status=1; \
	$(VENVS)/django52/bin/mypy || status=1; \
	cd src && ../$(VENVS)/django52/bin/lint-imports --config ../pyproject.toml || status=1; \
	exit $$status

# Every run always happens; the target fails if any failed.
test:
	@status=0; \
	echo "=== Static checks (make lint) ==="; $(MAKE) --no-print-directory lint || status=1; \
	echo "=== Django 5.2 LTS on Python 3.11, SQLite ==="; $(MAKE) --no-print-directory test-django52 || status=1; \
	echo "=== Django 6.0 on Python 3.13, SQLite ==="; $(MAKE) --no-print-directory test-django60 || status=1; \
	echo "=== Django 6.1 on Python 3.13, SQLite ==="; $(MAKE) --no-print-directory test-django61 || status=1; \
	echo "=== Django 5.2 LTS on Python 3.11, PostgreSQL ==="; $(MAKE) --no-print-directory test-postgres || status=1; \
	exit $$status

clean:
	rm -rf $(VENVS) demo/*.sqlite3*
