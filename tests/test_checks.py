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
