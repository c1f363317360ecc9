"""Configuration errors name the key and what is accepted, and stop start-up without a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from datacollector.config import CollectorConfig, ConfigError, load_config

VALID = """
rate_limits:
  default: {weight_per_minute: 1200, burst: 20}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collector.yaml"
    path.write_text(text)
    return path


def test_the_shipped_configuration_loads() -> None:
    config = load_config(settings.BASE_DIR / "config" / "collector.yaml")

    assert isinstance(config, CollectorConfig)
    assert config.rate_limit_for("unlisted-exchange") == config.rate_limits["default"]


def test_a_minimal_file_gets_the_defaults(tmp_path) -> None:
    config = load_config(write(tmp_path, VALID))

    assert config.scheduler.lease_seconds > 0
    assert config.collection.database_outage_seconds == 300.0
    assert config.rate_limits["default"].refill_per_second == 20.0


def test_missing_file_names_the_path_and_the_variable(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"not found: .*missing\.yaml \(set COLLECTOR_CONFIG\)"):
        load_config(tmp_path / "missing.yaml")


def test_bad_yaml_is_reported_with_the_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "rate_limits: [unclosed\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (VALID + "schedular: {}\n", "schedular: unknown key; accepted keys are rate_limits, indicators"),
        (VALID + "scheduler: {workerz: 2}\n", "scheduler.workerz: unknown key; accepted keys are workers"),
        (VALID + "scheduler: {workers: two}\n", "scheduler.workers: expected an integer, got 'two'"),
        (VALID + "scheduler: {workers: true}\n", "scheduler.workers: expected an integer, got True"),
        (VALID + "scheduler: {workers: 0}\n", "scheduler.workers: must be greater than 0"),
        (VALID + "scheduler: {backoff_base_seconds: -1}\n", "scheduler.backoff_base_seconds: must not be negative"),
        (VALID + "collection: {database_outage_seconds: -5}\n", "collection.database_outage_seconds: must not be"),
        (VALID + "collection: {database_outage_seconds: soon}\n", "collection.database_outage_seconds: expected a num"),
        (VALID + "indicators: {rsi: 14}\n", "indicators.rsi: expected a list of integers"),
        (VALID + "indicators: {rsi: [0]}\n", "indicators.rsi[0]: must be greater than 0"),
        (VALID + "indicators: {bollinger: [{std: 0}]}\n", "indicators.bollinger[0].std: must be greater than 0"),
        ("rate_limits:\n  binance: {weight_per_minute: 10, burst: 1}\n", "rate_limits.default: required key"),
        ("rate_limits:\n  default: {weight_per_minute: 10}\n", "rate_limits.default.burst: required key is missing"),
        (VALID + "indicators: {macd: [{fast: 30, slow: 26}]}\n", "indicators.macd: fast (30) must be less than slow"),
        ("- a list\n", "expected a mapping at the top level"),
    ],
)
def test_invalid_values_name_the_key_and_what_is_accepted(tmp_path, text, message) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, text))

    assert message in str(excinfo.value)


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    child_env = {**os.environ, "SECRET_KEY": "x", **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_collector_config_stops_start_up_naming_the_key_without_a_traceback(tmp_path) -> None:
    bad = write(tmp_path, VALID + "scheduler: {lease_seconds: 0}\n")

    result = manage("check", COLLECTOR_CONFIG=str(bad))

    assert result.returncode == 2
    assert "scheduler.lease_seconds: must be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_secret_key_stops_start_up_saying_so(tmp_path) -> None:
    result = manage("check", SECRET_KEY="", DEBUG="0")

    assert result.returncode == 2
    assert "SECRET_KEY must be set" in result.stderr
    assert "Traceback" not in result.stderr
