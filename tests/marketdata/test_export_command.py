"""manage.py export: the file written in the foreground, CommandErrors naming the flag, an empty range."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.core.management import CommandError, call_command

from apps.jobs.models import Task
from apps.marketdata import exports, store
from apps.marketdata.models import Export

pytestmark = pytest.mark.django_db

MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SERIES = ["--exchange-id", "binance", "--symbols", "BTC/USDT", "--timeframes", "1m"]


@pytest.fixture(autouse=True)
def export_dir(settings, tmp_path):
    settings.EXPORT_DIR = tmp_path / "exports"
    return settings.EXPORT_DIR


@pytest.fixture
def candles(sql_store) -> list[list]:
    rows = [[T0 + i * MINUTE, 100.0 + i, 101.0 + i, 99.0 + i, 100.5 + i, 2.5] for i in range(5)]
    store.upsert_candles("binance", "BTC/USDT", "1m", rows)
    return rows


def export(*args: str) -> str:
    out = io.StringIO()
    call_command("export", *args, stdout=out, verbosity=0)
    return out.getvalue()


def test_writes_the_file_prints_its_path_and_records_the_export(candles):
    output = export(*SERIES, "--format", "parquet", "--start", "2024-01-01T00:01:00Z", "--end", str(T0 + 3 * MINUTE))

    record = Export.objects.select_related("task").get()
    path = exports.export_path(record)
    assert output.startswith(str(path))
    assert "3 candles" in output
    assert (record.task.status, record.task.progress, record.rows) == (Task.Status.SUCCEEDED, 1.0, 3)
    table = pq.read_table(path)
    assert table.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    assert table.column("ts").cast(pa.int64()).to_pylist() == [row[0] for row in candles[1:4]]


def test_several_symbols_and_timeframes_give_a_zip(candles):
    store.upsert_candles("binance", "ETH/USDT", "1m", [[T0, 1.0, 2.0, 0.5, 1.5, 3.0]])

    export("--exchange-id", "binance", "--symbols", "BTC/USDT", "ETH/USDT", "--timeframes", "1m", "--format", "csv")

    record = Export.objects.get()
    assert exports.export_path(record).suffix == ".zip"
    assert record.rows == 6


def test_an_empty_range_writes_a_file_without_rows(candles):
    output = export(*SERIES, "--format", "parquet", "--start", "2025-01-01")

    record = Export.objects.select_related("task").get()
    assert (record.task.status, record.rows) == (Task.Status.SUCCEEDED, 0)
    assert "0 candles" in output
    assert pq.read_table(exports.export_path(record)).num_rows == 0


@pytest.mark.parametrize(
    ("args", "flag", "message"),
    [
        (["--format", "xlsx"], "--format", "use csv, json, parquet, freqtrade"),
        (["--format", "csv", "--start", "yesterday"], "--start", "not a date"),
        (["--format", "csv", "--end", "2024-13-01"], "--end", "not a date"),
        (["--format", "csv", "--start", "2024-01-02", "--end", "2024-01-01"], "--start", "after end"),
        (["--format", "freqtrade", "--indicators"], "--indicators", "indicators false"),
    ],
)
def test_bad_input_is_a_command_error_naming_the_flag(candles, args, flag, message):
    with pytest.raises(CommandError) as error:
        export(*SERIES, *args)

    assert str(error.value).startswith(f"{flag}: ")
    assert message in str(error.value)
    assert not Export.objects.exists()


@pytest.mark.parametrize(
    ("series", "flag", "message"),
    [
        (
            ["--exchange-id", "nosuchexchange", "--symbols", "BTC/USDT", "--timeframes", "1m"],
            "--exchange-id",
            "Unknown",
        ),
        (["--exchange-id", "binance", "--symbols", "DOGE/USDT", "--timeframes", "1m"], "--symbols", "'DOGE/USDT'"),
        (["--exchange-id", "binance", "--symbols", "BTC/USDT", "--timeframes", "1m", "5m"], "--timeframes", "'5m'"),
        (["--exchange-id", "binance", "--symbols", "BTC/USDT", "--timeframes", "5x"], "--timeframes", "5x"),
    ],
)
def test_an_unknown_series_is_a_command_error_naming_the_flag(candles, series, flag, message):
    with pytest.raises(CommandError) as error:
        export(*series, "--format", "csv")

    assert str(error.value).startswith(f"{flag}: ")
    assert message in str(error.value)


def test_a_range_over_the_maximum_names_the_range_flags_and_the_maximum(candles, settings):
    settings.EXPORT_MAX_ROWS = 3

    with pytest.raises(CommandError) as error:
        export(*SERIES, "--format", "csv")

    assert str(error.value).startswith("--start/--end: ")
    assert "at most 3 (EXPORT_MAX_ROWS)" in str(error.value)


def test_a_missing_required_flag_is_a_command_error(candles):
    with pytest.raises(CommandError, match="--format"):
        export(*SERIES)
