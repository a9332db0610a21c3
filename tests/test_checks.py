"""System checks report configuration problems at start, with ids."""

from __future__ import annotations

from kipekee.checks import check_settings


def ids(settings_value, settings) -> list[str]:
    settings.KIPEKEE = settings_value
    return [m.id for m in check_settings()]


def test_valid_configuration_passes(settings):
    good = {"PROVIDERS": {"p": {"BACKEND": "kipekee.backends.smtp.EmailBackend",
                                "OPTIONS": {"host": "smtp.example.com"}}}}
    assert ids(good, settings) == []


def test_no_providers_warns(settings):
    assert ids({}, settings) == ["kipekee.W001"]


def test_bad_settings_are_errors(settings):
    assert ids({"MODE": "soon"}, settings) == ["kipekee.E001"]
    assert ids({"PROVIDERS": {"p": {"OPTIONS": {}}}}, settings) == ["kipekee.E001"]
    assert ids({"PROVIDERS": {"p": {"BACKEND": "kipekee.backend.EmailBackend"}}}, settings) == ["kipekee.E001"]
    assert ids({"PROVIDRES": {}}, settings) == ["kipekee.E001"]
    assert ids({"RETRY": {"MAX_ATTEMPTS": 0}}, settings) == ["kipekee.E001"]


def test_unimportable_backend_is_an_error(settings):
    assert ids({"PROVIDERS": {"p": {"BACKEND": "nowhere.Backend"}}}, settings) == ["kipekee.E002"]
    assert ids({"PROVIDERS": {"p": {"BACKEND": "kipekee.models.OutboxEmail"}}}, settings) == ["kipekee.E002"]


def test_mailtrap_without_a_rate_limit_warns(settings):
    mailtrap = {"BACKEND": "kipekee.backends.mailtrap.EmailBackend", "OPTIONS": {"api_token": "t"}}
    assert ids({"PROVIDERS": {"m": mailtrap}}, settings) == ["kipekee.W002"]
    limited = {**mailtrap, "LIMITS": {"RATE": "150/10s"}}
    assert ids({"PROVIDERS": {"m": limited}}, settings) == []


def test_webhook_secret_setting(settings):
    assert ids({"WEBHOOK_SECRET": ["mailtrap:old", "mailtrap:new"]}, settings) == ["kipekee.W001"]
    assert ids({"WEBHOOK_SECRET": "no-colon"}, settings) == ["kipekee.E001"]
    assert ids({"WEBHOOK_SECRET": "user:"}, settings) == ["kipekee.E001"]
SMTP = "kipekee.backends.smtp.EmailBackend"


def smtp(**options):
    return {"BACKEND": SMTP, "OPTIONS": {"host": "smtp.example.com", "use_tls": True, **options}}


def test_provider_loop_is_its_own_error(settings):
    # A subclass of the drop-in passes conf's exact-path test, and still loops.
    assert ids({"PROVIDERS": {"p": {"BACKEND": "tests.app.backends.LoopingBackend"}}},
               settings) == ["kipekee.E010"]


def test_provider_that_cannot_be_built(settings):
    assert ids({"PROVIDERS": {"p": smtp(host="")}}, settings) == ["kipekee.E011"]
    assert ids({"PROVIDERS": {"p": smtp(hots="typo.example.com")}}, settings) == ["kipekee.E011"]
    assert ids({"PROVIDERS": {"p": smtp(username="ann")}}, settings) == ["kipekee.E011"]


def test_missing_secret(settings):
    # os.environ.get("SMTP_PASSWORD", "") in a settings file, with the variable unset.
    assert ids({"PROVIDERS": {"p": smtp(username="ann", password="")}}, settings) == ["kipekee.E012"]
    assert ids({"PROVIDERS": {"p": smtp(username="ann", password="s3cret")}}, settings) == []


def test_password_in_clear_warns_unless_local(settings):
    clear = smtp(username="ann", password="s3cret", use_tls=False)
    assert ids({"PROVIDERS": {"p": clear}}, settings) == ["kipekee.W010"]
    local = {**clear, "OPTIONS": {**clear["OPTIONS"], "host": "127.0.0.1"}}
    assert ids({"PROVIDERS": {"p": local}}, settings) == []
    ssl = smtp(username="ann", password="s3cret", use_tls=False, use_ssl=True)
    assert ids({"PROVIDERS": {"p": ssl}}, settings) == []


def test_development_backend_warns_only_without_debug(settings):
    console = {"PROVIDERS": {"dev": {"BACKEND": "django.core.mail.backends.console.EmailBackend"}}}
    settings.DEBUG = False
    assert ids(console, settings) == ["kipekee.W011"]
    settings.DEBUG = True
    assert ids(console, settings) == []


def test_placeholder_from_address_warns(settings):
    good = {"PROVIDERS": {"p": smtp()}}
    settings.DEFAULT_FROM_EMAIL = "webmaster@localhost"
    assert ids(good, settings) == ["kipekee.W012"]
    settings.DEFAULT_FROM_EMAIL = "Shop <orders@shop.example>"
    assert ids(good, settings) == []


def test_metrics_need_prometheus_client(settings, monkeypatch):
    good = {"PROVIDERS": {"p": smtp()}, "METRICS": True}
    assert ids(good, settings) == []
    # prometheus-client is installed in the test venv; hide it to see the check fire.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "prometheus_client" else real(name, *a))
    assert ids(good, settings) == ["kipekee.E013"]


def test_operations_settings_are_validated(settings):
    assert ids({"RETENTION": {"DAYS": 0}}, settings) == ["kipekee.E001"]
    assert ids({"RETENTION": {"ACTION": "shred"}}, settings) == ["kipekee.E001"]
    assert ids({"CHECK": {"FAILURE_RATE_MAX": 20}}, settings) == ["kipekee.E001"]
    assert ids({"CHECK": {"HEARTBEAT_MAXAGE": 20}}, settings) == ["kipekee.E001"]
    assert ids({"METRICS": "yes"}, settings) == ["kipekee.E001"]
