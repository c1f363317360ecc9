"""`manage.py backfill`: argument validation, collection through the jobs, resuming after Ctrl-C.

Collection runs in worker threads with their own database connections, so those tests are
transactional (the threads must see committed rows); the Ctrl-C test runs the real command in a
subprocess and interrupts it with SIGINT.
"""

import io
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from apps.connectors import exchanges
from apps.connectors.exchanges import SimulatedClient
from apps.connectors.models import Connector
from apps.jobs.management.commands.backfill import parse_when
from apps.jobs.models import Job, Run, backfill_owner
from apps.marketdata import store
from apps.marketdata.timeframes import datetime_to_ms

NOW = datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC)
MINUTE = 60_000
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_clients(settings):
    settings.MONGODB_URI = ""
    store.reset_mongo_client()
    exchanges.clear_clients()
    yield
    exchanges.clear_clients()


@pytest.fixture
def simulated(db) -> Connector:
    return Connector.objects.create(exchange_id="simulated")


def backfill(*args: str) -> str:
    out = io.StringIO()
    call_command("backfill", *args, stdout=out, stderr=io.StringIO(), verbosity=0)
    return out.getvalue()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-01-02", datetime(2024, 1, 2, tzinfo=UTC)),
        ("2024-01-02T03:04", datetime(2024, 1, 2, 3, 4, tzinfo=UTC)),
        ("2024-01-02 03:04:05", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2024-01-02T05:04:05+02:00", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("1704164645000", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
def test_dates_are_iso_in_utc_or_epoch_milliseconds(value, expected):
    assert parse_when(value, "--since") == datetime_to_ms(expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exchange", "nope"], "--exchange: Unknown exchange id 'nope'"),
        (["--exchange", "kraken"], "--exchange: No connector is configured for exchange 'kraken'"),
        (["--timeframe", "7m"], "--timeframe: Timeframe '7m' is not offered by simulated; it offers: 1m"),
        (["--symbol", "BTCUSDT"], "--symbol: Symbol 'BTCUSDT' is not a ccxt unified symbol"),
        (["--symbol", "BTC/USDT,NOPE/USDT"], "--symbol: NOPE/USDT not listed by simulated"),
        (["--since", "last week"], "--since 'last week' is not a date. Accepted: ISO 8601"),
        (["--since", "1704164645"], "looks like epoch seconds"),
        (["--since", "2999-01-01"], "is in the future"),
        (["--until", "2023-12-31"], "--until '2023-12-31' must be after --since '2024-01-01'"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--prefetch", "-1"], "--prefetch must be 0 or more"),
        (["--processes", "0"], "--processes must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_fetched(simulated, args, message):
    defaults = {"--exchange": "simulated", "--symbol": "BTC/USDT", "--timeframe": "1h", "--since": "2024-01-01"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        defaults[flag] = value
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        backfill(*[part for pair in defaults.items() for part in pair])
    assert not Job.objects.exists()


def test_a_disabled_connector_is_refused(simulated):
    simulated.enabled = False
    simulated.save()
    with pytest.raises(CommandError, match="connector is disabled"):
        backfill("--exchange", "simulated", "--symbol", "BTC/USDT", "--timeframe", "1h", "--since", "2024-01-01")


def test_a_connector_the_client_refuses_is_a_command_error(db):
    # A row saved before credential names were checked (update() skips validation, as an old row never met it).
    connector = Connector.objects.create(exchange_id="binance")
    Connector.objects.filter(pk=connector.pk).update(api_key_env="DATABASE_URL")
    with pytest.raises(CommandError, match=r"--exchange: the binance connector cannot be used: .*api_key_env must be"):
        backfill("--exchange", "binance", "--symbol", "BTC/USDT", "--timeframe", "1h", "--since", "2024-01-01")
    assert not Job.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_backfill_collects_every_series_through_jobs_and_runs():
    Connector.objects.create(exchange_id="simulated")
    with time_machine.travel(NOW, tick=False):
        output = backfill(
            "--exchange", "simulated", "--symbol", "BTC/USDT,ETH/USDT", "--timeframe", "1m,1h",
            "--since", "2024-02-29T12:00", "--workers", "3",
        )  # fmt: skip

    assert Job.objects.count() == 4
    client = SimulatedClient()
    for job in Job.objects.all():
        step = 60_000 if job.timeframe == "1m" else 3_600_000
        last_closed = datetime_to_ms(NOW) // step * step - step
        expected_ts = list(range(datetime_to_ms(datetime(2024, 2, 29, 12, tzinfo=UTC)), last_closed + 1, step))
        rows = store.read_candles("simulated", job.symbol, job.timeframe)
        assert [row[0] for row in rows] == expected_ts
        assert rows[7] == client.candle(job.symbol, job.timeframe, rows[7][0])
        assert job.cursor == last_closed
        assert job.lease_owner == ""
        run = Run.objects.get(job=job)
        assert run.status == Run.Status.SUCCESS
        assert run.candles_written == len(expected_ts)
        assert run.worker.startswith("backfill:")
    assert "Backfill: 2928 candles written" in output
    assert "0 rate-limit answers (429/418), 0 open gaps" in output


@pytest.mark.django_db(transaction=True)
def test_several_processes_share_the_series_and_collect_each_once():
    Connector.objects.create(exchange_id="simulated")
    with time_machine.travel(NOW, tick=False):
        output = backfill(
            "--exchange", "simulated", "--symbol", "BTC/USDT,ETH/USDT", "--timeframe", "1m,1h",
            "--since", "2024-02-29T12:00", "--workers", "2", "--processes", "2",
        )  # fmt: skip

    for job in Job.objects.all():
        step = 60_000 if job.timeframe == "1m" else 3_600_000
        last_closed = datetime_to_ms(NOW) // step * step - step
        expected_ts = list(range(datetime_to_ms(datetime(2024, 2, 29, 12, tzinfo=UTC)), last_closed + 1, step))
        assert [row[0] for row in store.read_candles("simulated", job.symbol, job.timeframe)] == expected_ts
        assert (job.cursor, job.lease_owner) == (last_closed, "")
        (run,) = Run.objects.filter(job=job)
        assert run.status == Run.Status.SUCCESS
        assert f":{os.getpid()}:" not in run.worker  # collected by a child process
    assert "Backfill: 2928 candles written" in output
    assert output.count(": done;") == 4


@pytest.mark.django_db(transaction=True)
def test_an_earlier_since_fills_the_history_before_what_is_stored():
    args = ["--exchange", "simulated", "--symbol", "BTC/USDT", "--timeframe", "1h"]
    Connector.objects.create(exchange_id="simulated")
    with time_machine.travel(NOW, tick=False):
        backfill(*args, "--since", "2024-02-29")
        output = backfill(*args, "--since", "2024-02-28")

    rows = store.read_candles("simulated", "BTC/USDT", "1h")
    assert [row[0] for row in rows] == list(
        range(datetime_to_ms(datetime(2024, 2, 28, tzinfo=UTC)), datetime_to_ms(NOW) - 3_600_000, 3_600_000)
    )
    assert "reused" in output
    assert "24 candles written" in output


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_ctrl_c_stops_after_the_current_page_and_a_second_run_continues():
    # 150 ms per request: slow enough to interrupt half-way through 6 pages of 1m candles.
    Connector.objects.create(exchange_id="simulated", options={"latency_ms": 150})
    since_ms = datetime_to_ms(datetime.now(UTC)) // MINUTE * MINUTE - 6_000 * MINUTE
    settings_dict = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{settings_dict['USER']}@{settings_dict['HOST']}:{settings_dict['PORT']}/"
        f"{settings_dict['NAME']}",
        "SECRET_KEY": "x",
        "MONGODB_URI": "",
    }
    command = [sys.executable, "manage.py", "backfill", "--exchange", "simulated", "--symbol", "BTC/USDT"]
    command += ["--timeframe", "1m", "--since", str(since_ms)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if Job.objects.filter(cursor__isnull=False).exists():
                break
            time.sleep(0.05)
        else:
            pytest.fail("the backfill stored no page within 60 s")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Interrupted: run the same command again" in out
    job = Job.objects.get()
    first_cursor = job.cursor
    assert since_ms < first_cursor < datetime_to_ms(datetime.now(UTC)) - 2 * MINUTE  # stopped half-way
    stored_first = store.read_candles("simulated", "BTC/USDT", "1m")
    assert [row[0] for row in stored_first] == list(range(since_ms, first_cursor + 1, MINUTE))

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job.refresh_from_db()
    rows = store.read_candles("simulated", "BTC/USDT", "1m")
    assert [row[0] for row in rows] == list(range(since_ms, job.cursor + 1, MINUTE))
    assert job.cursor >= datetime_to_ms(datetime.now(UTC)) // MINUTE * MINUTE - 3 * MINUTE
    first_run, second_run = Run.objects.order_by("started_at")
    assert first_run.candles_written + second_run.candles_written == len(rows)  # continued, not restarted
    assert "(cursor " in result.stdout


def test_a_negative_max_outage_is_refused(simulated):
    with pytest.raises(CommandError, match="--max-outage must be 0 or more, got -1"):
        backfill("--exchange", "simulated", "--symbol", "BTC/USDT", "--timeframe", "1h", "--since", "2024-01-01",
                 "--max-outage", "-1")  # fmt: skip


def leased_job(connector: Connector, owner: str) -> tuple[Job, Run]:
    job = Job.objects.create(connector=connector, symbol="BTC/USDT", timeframe="1h")
    Job.objects.filter(pk=job.pk).update(lease_owner=owner, lease_expires_at=timezone.now() + timedelta(hours=1))
    return job, Run.objects.create(job=job, worker=owner)


def test_the_lease_of_a_dead_backfill_of_this_host_is_taken_over_at_once(simulated):
    dead = subprocess.Popen(["true"])  # a process that surely no longer runs once waited for
    dead.wait()
    job, left_open = leased_job(simulated, f"backfill:{socket.gethostname()}:{dead.pid}:0")

    run = Job.objects.claim_for_backfill(job, backfill_owner(0), lease_seconds=600)

    assert run is not None
    assert run.worker == backfill_owner(0)
    job.refresh_from_db()
    assert job.lease_owner == backfill_owner(0)
    left_open.refresh_from_db()
    assert (left_open.status, left_open.error) == (Run.Status.FAILED, Run.LEASE_EXPIRED)


@pytest.mark.parametrize(
    "owner",
    [
        pytest.param("backfill:{host}:{live}:0", id="a live backfill of this host"),
        pytest.param("backfill:elsewhere:{dead}:0", id="a backfill of another host"),
        pytest.param("scheduler-1:42/7", id="a scheduler"),
    ],
)
def test_a_lease_whose_holder_may_still_run_is_left_alone(simulated, owner):
    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        holder = owner.format(host=socket.gethostname(), live=live.pid, dead=dead.pid)
        job, _ = leased_job(simulated, holder)
        assert Job.objects.claim_for_backfill(job, backfill_owner(0), lease_seconds=600) is None
    finally:
        live.kill()
        live.wait()
    job.refresh_from_db()
    assert job.lease_owner == holder


def test_claiming_again_after_a_lost_answer_returns_the_run_already_open(simulated):
    job = Job.objects.create(connector=simulated, symbol="BTC/USDT", timeframe="1h")
    first = Job.objects.claim_for_backfill(job, backfill_owner(0), lease_seconds=600)

    again = Job.objects.claim_for_backfill(job, backfill_owner(0), lease_seconds=600)

    assert again is not None
    assert again.pk == first.pk
    assert Run.objects.filter(job=job).count() == 1
    assert again.status == Run.Status.RUNNING
