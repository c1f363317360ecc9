from datetime import timedelta

from django.urls import reverse
from django.utils import timezone

from apps.connectors.models import Connector
from apps.jobs.models import Job
from apps.ratelimits.models import RateLimit

CONNECTOR_FORM = {
    "name": "",
    "enabled": "on",
    "options": "{}",
    "rate_limit_weight_per_minute": "",
    "rate_limit_burst": "",
    "api_key_env": "",
    "api_secret_env": "",
    "api_password_env": "",
    "jobs-TOTAL_FORMS": "0",
    "jobs-INITIAL_FORMS": "0",
}


def test_connector_add_form_shows_an_error_for_an_unknown_exchange_id(admin_client, db) -> None:
    response = admin_client.post(reverse("admin:connectors_connector_add"), {**CONNECTOR_FORM, "exchange_id": "nope"})

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "Unknown exchange id 'nope'" in " ".join(errors["exchange_id"])
    assert not Connector.objects.exists()


def test_connector_add_form_shows_errors_for_options_and_rate_limits(admin_client, db) -> None:
    response = admin_client.post(
        reverse("admin:connectors_connector_add"),
        {**CONNECTOR_FORM, "exchange_id": "binance", "options": "[1, 2]", "rate_limit_burst": "0"},
    )

    errors = response.context["adminform"].form.errors
    assert "options must be a JSON object" in " ".join(errors["options"])
    assert "positive integer" in " ".join(errors["rate_limit_burst"])


def test_connector_add_form_creates_a_valid_connector(admin_client, db) -> None:
    response = admin_client.post(reverse("admin:connectors_connector_add"), {**CONNECTOR_FORM, "exchange_id": "kraken"})

    assert response.status_code == 302
    assert Connector.objects.get().exchange_id == "kraken"


def test_connector_page_lists_its_jobs_and_links_to_them(admin_client, job, simulated) -> None:
    response = admin_client.get(reverse("admin:connectors_connector_change", args=[simulated.pk]))

    content = response.content.decode()
    assert response.status_code == 200
    assert "BTC/USDT" in content
    assert f"?connector__id__exact={simulated.pk}" in content
    assert f"?connector={simulated.pk}" in content


def test_connector_actions_stop_and_start_their_jobs(admin_client, job, simulated) -> None:
    url = reverse("admin:connectors_connector_changelist")

    admin_client.post(url, {"action": "stop_connectors", "_selected_action": [simulated.pk]})
    job.refresh_from_db()
    assert job.status == Job.Status.PAUSED

    admin_client.post(url, {"action": "start_connectors", "_selected_action": [simulated.pk]})
    job.refresh_from_db()
    assert job.status == Job.Status.ACTIVE


def test_rate_limit_panel_shows_buckets_and_is_read_only(admin_client, db) -> None:
    RateLimit.objects.filter(exchange_id="binance").delete()
    row = RateLimit.objects.create(
        exchange_id="binance",
        capacity=300,
        refill_per_second=90,
        tokens=12,
        circuit_open_until=timezone.now() + timedelta(minutes=1),
        denied=4,
    )

    panel = admin_client.get(reverse("admin:ratelimits_ratelimit_changelist"))

    assert panel.status_code == 200
    content = panel.content.decode()
    assert "binance" in content
    assert "open" in content
    assert "<progress" in content
    assert admin_client.get(reverse("admin:ratelimits_ratelimit_add")).status_code == 403
    assert (
        admin_client.post(reverse("admin:ratelimits_ratelimit_delete", args=[row.pk]), {"post": "yes"}).status_code
        == 403
    )
