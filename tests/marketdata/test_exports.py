"""Exports: the writer (files read back with pyarrow and pandas), the API (202, status, download, 400s,
410, who may see what) and a real run through run_task, on the SQL store and on MongoDB (mongomock-ng)."""

import io
import json
import zipfile
from datetime import timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from apps.connectors.models import Connector
from apps.jobs.management.commands.run_scheduler import Scheduler
from apps.jobs.models import Job, Task
from apps.jobs.tasks import run_task
from apps.marketdata import exports, indicators, store
from apps.marketdata.models import Export
from tests.conftest import grant
from tests.jobs.test_run_scheduler import finish, start_scheduler

pytestmark = pytest.mark.django_db

URL = "/api/v1/data/export"
MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


@pytest.fixture(autouse=True)
def export_dir(settings, tmp_path):
    settings.EXPORT_DIR = tmp_path / "exports"
    return settings.EXPORT_DIR


def store_minutes(symbol: str = "BTC/USDT", count: int = 5, timeframe: str = "1m", exchange_id: str = "binance"):
    step = MINUTE if timeframe == "1m" else 3_600_000
    rows = [[T0 + i * step, 100.0 + i, 101.0 + i, 99.0 + i, 100.5 + i, 2.5 + i] for i in range(count)]
    store.upsert_candles(exchange_id, symbol, timeframe, rows)
    return rows


def make_export(**fields) -> Export:
    params = {"exchange_id": "binance", "symbols": ["BTC/USDT"], "timeframes": ["1m"], "format": "parquet"}
    params.update(fields)
    return exports.request_export(**params)


def run(export: Export) -> Export:
    task = Task.objects.filter(pk=export.task_id).claim("test-worker", 60)
    assert run_task(task) == Task.Status.SUCCEEDED, Task.objects.get(pk=task.pk).error
    return Export.objects.select_related("task").get(pk=export.pk)


def test_parquet_has_ms_utc_timestamps_float64_values_and_reads_back_in_pyarrow_and_pandas(candle_store):
    rows = store_minutes(count=5)
    export = run(make_export(start_ts=T0 + MINUTE, end_ts=T0 + 3 * MINUTE))

    assert (export.rows, export.task.progress) == (3, 1.0)
    path = exports.export_path(export)
    assert path.name == "binance_BTC_USDT_1m.parquet"
    assert export.size == path.stat().st_size
    table = pq.read_table(path)
    assert table.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert [table.schema.field(name).type for name in ("open", "high", "low", "close", "volume")] == [pa.float64()] * 5
    assert table.column("ts").cast(pa.int64()).to_pylist() == [row[0] for row in rows[1:4]]
    frame = pd.read_parquet(path)
    assert str(frame["ts"].dtype) == "datetime64[ms, UTC]"
    assert frame["close"].tolist() == [row[4] for row in rows[1:4]]


def test_parquet_is_written_in_row_groups_of_the_chunk_size(sql_store, monkeypatch):
    store_minutes(count=10)
    monkeypatch.setattr(store, "COLUMN_CHUNK", 4)
    export = run(make_export())
    metadata = pq.ParquetFile(exports.export_path(export)).metadata
    assert (metadata.num_rows, metadata.num_row_groups) == (10, 3)


def test_indicator_columns_are_added_with_nulls_where_no_value_is_stored(sql_store):
    store_minutes(count=40)
    indicators.recompute_series("binance", "BTC/USDT", "1m")
    export = run(make_export(indicators=True))
    frame = pd.read_parquet(exports.export_path(export))
    names = indicators.indicator_set().names
    assert list(frame.columns) == ["ts", "open", "high", "low", "close", "volume", *names]
    stored = dict(store.read_indicators("binance", "BTC/USDT", "1m"))
    for name in names:
        expected = [stored.get(ts, {}).get(name) for ts in range(T0, T0 + 40 * MINUTE, MINUTE)]
        got = [None if pd.isna(value) else value for value in frame[name]]
        assert got == expected


def test_csv_has_the_api_columns(candle_store):
    store_minutes(count=2)
    export = run(make_export(format="csv"))
    text = exports.export_path(export).read_text()
    assert text.splitlines()[0] == '"ts","time","open","high","low","close","volume"'
    frame = pd.read_csv(io.StringIO(text))
    assert frame["ts"].tolist() == [T0, T0 + MINUTE]
    assert frame["time"].tolist() == ["2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z"]
    assert frame["high"].tolist() == [101.0, 102.0]


def test_column_chunks_page_through_the_series_in_order_with_native_dtypes(candle_store):
    rows = store_minutes(count=7)
    chunks = list(store.iter_candle_columns("binance", "BTC/USDT", "1m", T0 + MINUTE, T0 + 5 * MINUTE, chunk_size=2))
    assert [len(chunk["ts"]) for chunk in chunks] == [2, 2, 1]
    assert (chunks[0]["ts"].dtype, chunks[0]["close"].dtype) == ("int64", "float64")
    for name, column in zip(("ts", "open", "high", "low", "close", "volume"), range(6), strict=True):
        assert [value for chunk in chunks for value in chunk[name].tolist()] == [row[column] for row in rows[1:6]]
    assert list(store.iter_candle_columns("binance", "BTC/USDT", "1m", T0 + 60 * MINUTE, None)) == []


def test_json_is_one_object_per_line(sql_store):
    store_minutes(count=2)
    export = run(make_export(format="json"))
    lines = exports.export_path(export).read_text().splitlines()
    assert json.loads(lines[1]) == {
        "ts": T0 + MINUTE,
        "time": "2024-01-01T00:01:00Z",
        "open": 101.0,
        "high": 102.0,
        "low": 100.0,
        "close": 101.5,
        "volume": 3.5,
    }
    assert len(pd.read_json(exports.export_path(export), lines=True)) == 2


def test_several_series_give_a_zip_of_one_file_each(candle_store):
    store_minutes("BTC/USDT", 3)
    store_minutes("ETH/USDT", 2)
    export = run(make_export(symbols=["BTC/USDT", "ETH/USDT"]))
    path = exports.export_path(export)
    assert path.suffix == ".zip"
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["binance_BTC_USDT_1m.parquet", "binance_ETH_USDT_1m.parquet"]
        assert pq.read_table(io.BytesIO(archive.read("binance_ETH_USDT_1m.parquet"))).num_rows == 2
    assert export.rows == 5


def test_freqtrade_layout_reads_back_as_freqtrades_feather_handler_does(sql_store, tmp_path):
    store_minutes("BTC/USDT", 3)
    store_minutes("BTC/USDT:USDT", 2, timeframe="1h")
    export = run(make_export(symbols=["BTC/USDT", "BTC/USDT:USDT"], timeframes=["1m", "1h"], format="freqtrade"))
    with zipfile.ZipFile(exports.export_path(export)) as archive:
        assert sorted(archive.namelist()) == [
            "binance/BTC_USDT-1m.feather",
            "binance/futures/BTC_USDT_USDT-1h-futures.feather",
        ]
        archive.extractall(tmp_path / "data")
    # What freqtrade's FeatherDataHandler._ohlcv_load does with a file (freqtrade 2022.9 to 2024.9).
    pairdata = pd.read_feather(tmp_path / "data/binance/BTC_USDT-1m.feather")
    pairdata.columns = ["date", "open", "high", "low", "close", "volume"]
    pairdata = pairdata.astype({name: "float" for name in ["open", "high", "low", "close", "volume"]})
    pairdata["date"] = pd.to_datetime(pairdata["date"], unit="ms", utc=True)
    assert str(pairdata["date"].dtype).startswith("datetime64[")
    assert str(pairdata["date"].dtype).endswith(", UTC]")
    assert pairdata["date"].iloc[0] == pd.Timestamp("2024-01-01T00:00:00Z")
    assert pairdata["close"].tolist() == [100.5, 101.5, 102.5]
    futures = pd.read_feather(tmp_path / "data/binance/futures/BTC_USDT_USDT-1h-futures.feather")
    assert list(futures.columns) == ["date", "open", "high", "low", "close", "volume"]
    assert len(futures) == 2


def test_an_empty_range_is_a_finished_export_with_zero_rows(candle_store):
    store_minutes(count=3)
    export = run(make_export(start_ts=T0 + 100 * MINUTE))
    assert (export.task.status, export.rows) == (Task.Status.SUCCEEDED, 0)
    assert pq.read_table(exports.export_path(export)).num_rows == 0


def test_expired_files_are_deleted_when_an_export_task_runs(sql_store):
    store_minutes(count=2)
    old = run(make_export())
    Export.objects.filter(pk=old.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    run(make_export(format="csv"))
    old.refresh_from_db()
    assert old.file_path == ""
    assert not exports.export_dir(old).exists()


def test_delete_expired_files_deletes_only_expired_exports_files(sql_store):
    store_minutes(count=2)
    expired, current = run(make_export()), run(make_export(format="csv"))
    Export.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    assert exports.delete_expired_files() == 1
    assert exports.delete_expired_files() == 0  # its row no longer names a file
    expired.refresh_from_db()
    assert (expired.file_path, exports.export_dir(expired).exists()) == ("", False)
    assert exports.export_path(current).exists()


def test_an_idle_scheduler_deletes_expired_export_files(sql_store):
    store_minutes(count=2)
    export = run(make_export())
    Export.objects.filter(pk=export.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    scheduler = Scheduler(
        "test:1",
        lambda run: None,
        batch_size=1,
        lease_seconds=60,
        schedule_delay_seconds=2.0,
        backoff_base_seconds=5.0,
        backoff_max_seconds=900.0,
    )

    scheduler.reap()

    assert not exports.export_dir(export).exists()
    assert Export.objects.get(pk=export.pk).file_path == ""


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_scheduler_process_writes_a_queued_export(sql_store, export_dir, tmp_path, monkeypatch):
    rows = store_minutes(count=5)
    export = make_export(format="parquet")
    # The child reads its settings from the environment: the same export directory, the embedded store.
    monkeypatch.setenv("EXPORT_DIR", str(export_dir))
    monkeypatch.setenv("MONGODB_URI", "")
    process = start_scheduler(
        tmp_path, "exporter", "--once", "--workers", "1", "--collector", "tests.jobs.standins.instant"
    )
    assert finish(process, tmp_path, "exporter") == 0

    export = Export.objects.select_related("task").get(pk=export.pk)
    assert (export.task.status, export.task.lease_owner, export.rows) == (Task.Status.SUCCEEDED, "", 5)
    assert export.task.result == {"export_id": export.pk, "rows": 5, "size": export.size, "file": export.file_path}
    table = pq.read_table(exports.export_path(export))
    assert table.column("ts").cast(pa.int64()).to_pylist() == [row[0] for row in rows]


# --- API --------------------------------------------------------------------------------------------


@pytest.fixture
def other_client(db) -> APIClient:
    other = grant(get_user_model().objects.create_user("other", password="other-password-1"))
    client = APIClient()
    client.force_authenticate(other)
    return client


@pytest.fixture
def staff_client(db) -> APIClient:
    staff = get_user_model().objects.create_user("staff", password="staff-password-1", is_staff=True)
    staff = grant(staff, "view_export")
    client = APIClient()
    client.force_authenticate(staff)
    return client


BODY = {"exchange_id": "binance", "symbols": ["BTC/USDT"], "timeframes": ["1m"], "format": "csv"}


def test_post_answers_202_and_a_worker_writes_it_then_only_the_owner_and_staff_download(
    api_client, other_client, staff_client, sql_store
):
    store_minutes(count=4)
    response = api_client.post(URL, {**BODY, "start": "2024-01-01T00:01:00Z"}, format="json")
    assert response.status_code == 202, response.json()
    body = response.json()
    assert (body["status"], body["progress"], body["download"]) == ("pending", 0.0, None)
    assert response["Location"].endswith(f"{URL}/{body['id']}")

    run(Export.objects.get(pk=body["id"]))
    detail = api_client.get(f"{URL}/{body['id']}").json()
    assert (detail["status"], detail["rows"], detail["progress"]) == ("succeeded", 3, 1.0)
    assert detail["size"] > 0
    assert detail["download"].endswith(f"{URL}/{body['id']}/download")

    download = api_client.get(f"{URL}/{body['id']}/download")
    assert download.status_code == 200
    assert download["Content-Type"] == "text/csv"
    assert b"".join(download.streaming_content).count(b"\n") == 4
    assert staff_client.get(f"{URL}/{body['id']}/download").status_code == 200
    assert other_client.get(f"{URL}/{body['id']}").status_code == 404
    assert other_client.get(f"{URL}/{body['id']}/download").status_code == 404


def test_download_of_an_expired_export_is_410(api_client, sql_store):
    store_minutes(count=2)
    export = run(make_export(user=api_client.handler._force_user))
    Export.objects.filter(pk=export.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = api_client.get(f"{URL}/{export.pk}/download")
    assert response.status_code == 410
    assert "expired" in response.json()["detail"]
    assert api_client.get(f"{URL}/{export.pk}").json()["download"] is None


def test_download_before_it_is_written_is_409(api_client, sql_store):
    store_minutes(count=2)
    export = make_export(user=api_client.handler._force_user)
    response = api_client.get(f"{URL}/{export.pk}/download")
    assert response.status_code == 409
    assert "pending" in response.json()["detail"]


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"format": "xlsx"}, "format", "csv, json, parquet, freqtrade"),
        ({"symbols": ["DOGE/USDT"]}, "symbols", "DOGE/USDT"),
        ({"symbols": ["BTCUSDT"]}, "symbols", "BASE/QUOTE"),
        ({"timeframes": ["7x"]}, "timeframes", "7x"),
        ({"timeframes": ["1m", "1h"]}, "timeframes", "'1h'"),
        ({"exchange_id": "nope"}, "exchange_id", "nope"),
        ({"start": "2024-02-01", "end": "2024-01-01"}, "start", "after end"),
        ({"format": "freqtrade", "indicators": True}, "indicators", "freqtrade"),
        ({"symbols": []}, "symbols", ""),
    ],
)
def test_bad_input_is_a_400_naming_the_field(api_client, sql_store, change, field, says):
    store_minutes(count=2)
    response = api_client.post(URL, {**BODY, **change}, format="json")
    assert response.status_code == 400
    assert field in response.json(), response.json()
    assert says in " ".join(response.json()[field])
    assert not Export.objects.exists()


def test_a_symbol_collected_by_a_job_but_not_stored_yet_is_known(api_client, sql_store):
    connector = Connector.objects.create(exchange_id="binance")
    Job.objects.create(connector=connector, symbol="SOL/USDT", timeframe="1m")
    response = api_client.post(URL, {**BODY, "symbols": ["SOL/USDT"]}, format="json")
    assert response.status_code == 202


def test_a_range_over_the_maximum_rows_is_a_400_saying_the_maximum(api_client, sql_store, settings):
    settings.EXPORT_MAX_ROWS = 3
    store_minutes(count=5)
    response = api_client.post(URL, BODY, format="json")
    assert response.status_code == 400
    assert "at most 3" in response.json()["non_field_errors"][0]
    narrower = {**BODY, "start": str(T0), "end": str(T0 + 2 * MINUTE)}
    assert api_client.post(URL, narrower, format="json").status_code == 202


def test_exports_need_their_permissions(sql_store, db):
    nobody = get_user_model().objects.create_user("nobody", password="nobody-password-1")
    client = APIClient()
    client.force_authenticate(nobody)
    store_minutes(count=2)
    assert client.post(URL, BODY, format="json").status_code == 403
    assert client.get(f"{URL}/1").status_code == 403
    assert APIClient().post(URL, BODY, format="json").status_code in (401, 403)


def test_ids_beyond_64_bits_are_404(api_client):
    assert api_client.get(f"{URL}/99999999999999999999").status_code == 404
    assert api_client.get(f"{URL}/99999999999999999999/download").status_code == 404
