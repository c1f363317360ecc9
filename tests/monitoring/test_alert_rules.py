"""deploy/prometheus/alerts.yml: valid (`promtool check rules`), every alert unit-tested beside it
(`promtool test rules`: series that fire it and series that do not), and only about exported metrics."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from prometheus_client import REGISTRY

from apps.jobs.models import Job, Run
from apps.marketdata.models import Gap
from apps.ratelimits.models import RateLimit

RULES = Path(settings.BASE_DIR) / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = RULES.with_name("alerts.test.yml")
METRIC = re.compile(r"\b(?:dc|data_collector)_[a-z_]+")


def exported_names() -> set[str]:
    # Importing the scheduler command and the rate limiter registers their process metrics.
    import apps.jobs.management.commands.run_scheduler
    import apps.ratelimits.models  # noqa: F401

    names = set()
    for family in REGISTRY.collect():
        names.update(sample.name for sample in family.samples)
        # A labelled counter nobody incremented yet has no samples; its series is named <family>_total.
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess:
    # promtool comes from Debian's `prometheus` package; .ci/run installs it when missing.
    return subprocess.run(["promtool", *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120)


@pytest.mark.django_db
def test_every_alert_names_an_exported_metric_and_explains_itself(simulated) -> None:
    # Rows so that per-exchange families have samples to list (the connector brought its RateLimit).
    assert RateLimit.objects.filter(exchange_id="simulated").exists()
    Gap.objects.create(exchange_id="simulated", symbol="BTC/USDT", timeframe="1m", start_ts=0, end_ts=0, missing=1)
    job = Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1m")
    Run.objects.create(job=job, worker="w")
    exported = exported_names()

    assert rules()
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        referenced = set(METRIC.findall(rule["expr"]))
        assert referenced, rule["alert"]
        assert referenced <= exported, f"{rule['alert']} refers to {referenced - exported}"


def test_the_rules_are_valid() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not() -> None:
    fired, silent = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules()}

    assert alerts - fired == set(), "alerts no test fires"
    assert alerts - silent == set(), "alerts no test shows silent"


def test_the_denial_spike_is_a_warning_and_stalled_jobs_are_critical() -> None:
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in rules()}
    spike = next(rule for rule in rules() if rule["alert"] == "DataCollectorRateLimitDenialSpike")

    assert severity["DataCollectorRateLimitDenialSpike"] == "warning"
    assert "[5m]" in spike["expr"]
    assert "data_collector_rate_limited_responses_total" in spike["expr"]  # any 429/418
    assert severity["DataCollectorJobsStalled"] == "critical"
