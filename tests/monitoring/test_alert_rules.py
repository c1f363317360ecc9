"""deploy/prometheus/alerts.yml only refers to metrics the project exports."""

import re
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from prometheus_client import REGISTRY

from apps.jobs.models import Job, Run
from apps.marketdata.models import Gap
from apps.ratelimits.models import RateLimit

RULES = Path(settings.BASE_DIR) / "deploy" / "prometheus" / "alerts.yml"


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


@pytest.mark.django_db
def test_every_alert_names_an_exported_metric_and_explains_itself(simulated) -> None:
    # Rows so that per-exchange families have samples to list (the connector brought its RateLimit).
    assert RateLimit.objects.filter(exchange_id="simulated").exists()
    Gap.objects.create(exchange_id="simulated", symbol="BTC/USDT", timeframe="1m", start_ts=0, end_ts=0, missing=1)
    job = Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1m")
    Run.objects.create(job=job, worker="w")
    exported = exported_names()

    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert rules
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        referenced = set(re.findall(r"\bdc_[a-z_]+", rule["expr"]))
        assert referenced, rule["alert"]
        assert referenced <= exported, f"{rule['alert']} refers to {referenced - exported}"
