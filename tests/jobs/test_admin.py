import pytest
from django.urls import reverse

from apps.jobs.models import Job, Run


@pytest.mark.parametrize(
    "url_name",
    [
        "admin:index",
        "admin:connectors_connector_changelist",
        "admin:connectors_connector_add",
        "admin:jobs_job_changelist",
        "admin:jobs_job_add",
        "admin:jobs_run_changelist",
        "admin:ratelimits_ratelimit_changelist",
    ],
)
def test_admin_pages_load_for_staff_and_redirect_anonymous_to_login(admin_client, client, db, url_name) -> None:
    url = reverse(url_name)

    assert admin_client.get(url).status_code == 200
    anonymous = client.get(url)
    assert anonymous.status_code == 302
    assert "/admin/login/" in anonymous["Location"]


def test_job_page_shows_its_recent_runs_newest_first_and_limited(admin_client, job) -> None:
    for minute in range(25):
        Run.objects.create(job=job, worker=f"worker-{minute:02d}", started_at=job.created_at.replace(minute=minute))

    response = admin_client.get(reverse("admin:jobs_job_change", args=[job.pk]))

    assert response.status_code == 200
    content = response.content.decode()
    assert "worker-24" in content
    assert "worker-05" in content
    assert "worker-04" not in content  # 20 newest only
    assert content.index("worker-24") < content.index("worker-23")
    assert f"?job__id__exact={job.pk}" in content


def test_job_change_page_keeps_the_series_read_only(admin_client, job) -> None:
    url = reverse("admin:jobs_job_change", args=[job.pk])

    response = admin_client.post(
        url,
        {
            "status": "paused",
            "since": "",
            "symbol": "ETH/USDT",
            "runs-TOTAL_FORMS": "0",
            "runs-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    job.refresh_from_db()
    assert (job.symbol, job.status) == ("BTC/USDT", "paused")


def test_job_add_form_shows_errors_for_a_bad_symbol_and_timeframe(admin_client, binance) -> None:
    response = admin_client.post(
        reverse("admin:jobs_job_add"),
        {
            "connector": binance.pk,
            "symbol": "BTCUSDT",
            "timeframe": "2m",
            "status": "active",
            "runs-TOTAL_FORMS": "0",
            "runs-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "not a ccxt unified symbol" in " ".join(errors["symbol"])
    assert "'2m' is not offered by binance" in " ".join(errors["timeframe"])
    assert not Job.objects.exists()


def test_job_add_form_refuses_a_history_start_in_the_future(admin_client, binance) -> None:
    response = admin_client.post(
        reverse("admin:jobs_job_add"),
        {
            "connector": binance.pk,
            "symbol": "BTC/USDT",
            "timeframe": "1m",
            "status": "active",
            "since_0": "2999-01-01",
            "since_1": "00:00:00",
            "runs-TOTAL_FORMS": "0",
            "runs-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 200
    assert "since must not be in the future" in " ".join(response.context["adminform"].form.errors["since"])
    assert not Job.objects.exists()


def test_job_add_form_reports_a_duplicate_series(admin_client, job, simulated) -> None:
    response = admin_client.post(
        reverse("admin:jobs_job_add"),
        {
            "connector": simulated.pk,
            "symbol": "BTC/USDT",
            "timeframe": "1m",
            "status": "active",
            "runs-TOTAL_FORMS": "0",
            "runs-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 200
    assert "A job for simulated BTC/USDT 1m already exists" in response.content.decode()
    assert Job.objects.count() == 1


@pytest.mark.parametrize(
    ("action", "status"),
    [("pause_jobs", "paused"), ("resume_jobs", "active"), ("run_jobs_now", "active")],
)
def test_job_actions_call_the_queryset_methods(admin_client, job, action, status) -> None:
    Job.objects.filter(pk=job.pk).update(status=Job.Status.ERROR, last_error="boom")

    response = admin_client.post(reverse("admin:jobs_job_changelist"), {"action": action, "_selected_action": [job.pk]})

    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == status
    if status == "active":
        assert job.last_error == ""


def test_runs_are_read_only_in_the_admin(admin_client, job) -> None:
    run = Run.objects.create(job=job, worker="w")

    assert admin_client.get(reverse("admin:jobs_run_add")).status_code == 403
    change = admin_client.get(reverse("admin:jobs_run_change", args=[run.pk]))
    assert change.status_code == 200  # the view-only page
    assert b'name="_save"' not in change.content
    assert admin_client.post(reverse("admin:jobs_run_delete", args=[run.pk]), {"post": "yes"}).status_code == 403
    assert Run.objects.filter(pk=run.pk).exists()


def test_setting_a_failed_job_active_in_its_form_resumes_it(admin_client, job) -> None:
    Job.objects.filter(pk=job.pk).update(status=Job.Status.ERROR, last_error="boom", consecutive_failures=4)

    response = admin_client.post(
        reverse("admin:jobs_job_change", args=[job.pk]),
        {"status": "active", "since": "", "runs-TOTAL_FORMS": "0", "runs-INITIAL_FORMS": "0"},
    )

    assert response.status_code == 302
    job.refresh_from_db()
    assert (job.status, job.last_error, job.consecutive_failures) == ("active", "", 0)
