"""The dashboard and the chart in a real browser: headless Chromium driven by Selenium (Debian's chromium
and chromium-driver; .ci/run installs them), against a uvicorn server with the Redis layer and a real
`run_scheduler` process on the simulated exchange."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.core.management import call_command
from django.utils import timezone

from apps.connectors.models import Connector
from apps.jobs.models import Job
from tests.jobs.standins import child_env
from tests.monitoring.test_hub import REDIS_URL, needs_redis, start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    needs_redis,
    pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")), reason="no chromium"),
]
WAIT = 60


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def wait_until(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(condition)
    except TimeoutException:
        console = "\n".join(entry["message"] for entry in driver.get_log("browser"))
        raise AssertionError(f"timed out waiting for {what} on {driver.current_url}; console:\n{console}") from None


def test_dashboard_shows_a_new_candle_and_a_status_change_without_reloading_then_a_chart(
    tmp_path: Path, browser
) -> None:
    from selenium.webdriver.common.by import By

    admin = get_user_model().objects.create_superuser("admin")
    # The server process checks passwords with the default hashers, not the tests' fast one.
    admin.password = PBKDF2PasswordHasher().encode("admin-password-1", PBKDF2PasswordHasher().salt())
    admin.save()
    connector = Connector.objects.create(exchange_id="simulated")
    cursor = (int(time.time() * 1000) // 60_000 - 5) * 60_000
    job = Job.objects.create(
        connector=connector, symbol="BTC/USDT", timeframe="1m", cursor=cursor, next_run_at=timezone.now()
    )
    # A job whose symbol the exchange does not list: its run ends in status error.
    doomed = Job.objects.create(connector=connector, symbol="NOPE/USDT", timeframe="1m", next_run_at=timezone.now())
    call_command("collectstatic", "--noinput", verbosity=0)  # before the server: WhiteNoise lists them at start
    ws_url = start_server(tmp_path, REDIS_URL=REDIS_URL)
    base = ws_url.replace("ws://", "http://").removesuffix("/ws")

    browser.get(f"{base}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys("admin-password-1")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_until(browser, lambda d: d.find_element(By.ID, "hub-status").get_attribute("data-state") == "live", "live")
    assert browser.find_element(By.ID, "jobs-active").text == "2"
    page = browser.execute_script("return window.performance.timeOrigin")

    scheduler = subprocess.run(
        [sys.executable, "manage.py", "run_scheduler", "--once", "--workers", "2"],
        cwd=settings.BASE_DIR, env=child_env(REDIS_URL=REDIS_URL), capture_output=True, timeout=WAIT,
    )  # fmt: skip
    assert scheduler.returncode == 0, scheduler.stdout + scheduler.stderr

    new_candle = wait_until(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#live-feed li[data-kind="candle"]'), "a new candle"
    )
    assert "simulated BTC/USDT 1m: new candle" in new_candle[0].text
    status = wait_until(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#live-feed li[data-kind="status"]'), "a status change"
    )
    assert "simulated NOPE/USDT 1m: status active → error" in status[0].text
    assert browser.find_element(By.ID, "jobs-error").text == "1"
    assert browser.find_element(By.CSS_SELECTOR, f'#failing tr[data-job="{doomed.pk}"]').is_displayed()
    assert browser.execute_script("return window.performance.timeOrigin") == page  # no reload

    job.refresh_from_db()
    browser.find_element(By.CSS_SELECTOR, f'#freshest tr[data-job="{job.pk}"] a').click()
    chart = wait_until(browser, lambda d: d.find_element(By.ID, "chart"), "the chart")
    wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart canvas"), "the chart's canvas")
    assert int(chart.get_attribute("data-candles")) >= 3  # the candles the run stored after the cursor
    assert int(chart.get_attribute("data-last-time")) * 1000 == job.cursor
    wait_until(
        browser, lambda d: d.find_element(By.ID, "live-status").get_attribute("data-state") == "live", "chart live"
    )
    assert browser.find_element(By.CSS_SELECTOR, 'input[data-indicator="sma_20"]').is_selected()
