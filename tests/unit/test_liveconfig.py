"""What `jetsource config set` accepts: each live key's value validated as its setting is."""

from __future__ import annotations

import pytest

from infra.liveconfig import LIVE, BadValue, parse
from infra.settings import Settings


def test_values_are_read_as_json_or_bare_strings_and_validated_like_the_setting() -> None:
    assert parse("worker_concurrency", "64") == 64
    assert parse("rate_limit_per_s", "2.5") == 2.5
    assert parse("log_level", "warning") == "WARNING"
    assert parse("log_level", '"error"') == "ERROR"
    assert parse("projection_busy_linger_s", "0") == 0


@pytest.mark.parametrize(("key", "text"), [
    ("worker_concurrency", "0"), ("worker_concurrency", "1.5"), ("worker_concurrency", "true"),
    ("max_inflight", "0"), ("rate_limit_per_s", "-0.1"), ("log_level", "chatty"),
    ("projection_busy_linger_s", "5.1"), ("worker_concurrency", "[1]"),
    ("log_level", "[" * 100_000), ("breaker_cooldown_s", "Infinity"), ("breaker_cooldown_s", "NaN"),
])
def test_a_bad_value_is_refused_naming_the_key(key: str, text: str) -> None:
    with pytest.raises(BadValue, match=key):
        parse(key, text)


def test_only_live_settings_can_be_set() -> None:
    with pytest.raises(BadValue, match="is not a live setting; live settings: log_level"):
        parse("database_url", "postgresql://elsewhere")
    assert set(LIVE) <= set(Settings.model_fields)


def test_the_environment_refuses_what_set_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETSOURCE_LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="a log level is one of"):
        Settings(_env_file=None)
