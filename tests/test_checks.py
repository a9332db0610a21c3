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
