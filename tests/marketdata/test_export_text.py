"""The text formats of exports (CSV and JSON Lines): every float reads back bit for bit, the ISO time is
the API's, null and non-finite values, and lines are whole across the slices a chunk is formatted in.
Files are written by real export tasks on the SQL store and read back with the csv and json modules."""

import csv
import io
import json
import struct
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from apps.jobs.models import Task
from apps.jobs.tasks import run_task
from apps.marketdata import exports, store
from apps.marketdata.models import Export
from apps.marketdata.serializers import format_time

pytestmark = pytest.mark.django_db

MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
AWKWARD = [0.1 + 0.2, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e22, 1e-7, 123456.789, 0.0, 1.0]


@pytest.fixture(autouse=True)
def export_dir(settings, tmp_path):
    settings.EXPORT_DIR = tmp_path / "exports"


def awkward_candles(count: int, seed: int = 7) -> list[list]:
    """Candles whose values are random doubles of every magnitude (random bit patterns) and the usual
    troublemakers of float printing: shortest round-trip text is what they test."""
    bits = np.random.default_rng(seed).integers(0, 2**63 - 1, size=(count, 5), dtype=np.int64)
    values = np.abs(bits.view(np.float64))
    values[~np.isfinite(values)] = 1.5
    values.flat[: len(AWKWARD)] = AWKWARD
    return [[T0 + i * MINUTE, *map(float, row)] for i, row in enumerate(values)]


def export_file(format: str) -> bytes:
    export = exports.request_export(exchange_id="binance", symbols=["BTC/USDT"], timeframes=["1m"], format=format)
    task = Task.objects.filter(pk=export.task_id).claim("test-worker", 60)
    assert run_task(task) == Task.Status.SUCCEEDED, Task.objects.get(pk=task.pk).error
    return exports.export_path(Export.objects.get(pk=export.pk)).read_bytes()


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


def test_csv_values_read_back_bit_for_bit_across_text_slices_and_writes(sql_store, monkeypatch):
    monkeypatch.setattr(exports, "TEXT_SLICE", 7)  # several slices per chunk, and a short last one
    monkeypatch.setattr(exports, "WRITE_PIECE", 50)  # lines split across writes
    candles = awkward_candles(40)
    store.upsert_candles("binance", "BTC/USDT", "1m", candles)
    text = export_file("csv").decode()
    assert text.endswith("\n")
    assert text.count("\n") == 41  # the header and 40 lines, each ended once
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["ts", "time", "open", "high", "low", "close", "volume"]
    assert [int(row[0]) for row in rows[1:]] == [candle[0] for candle in candles]
    assert [row[1] for row in rows[1:]] == [format_time(candle[0]) for candle in candles]
    for row, candle in zip(rows[1:], candles, strict=True):
        assert [bits(float(text)) for text in row[2:]] == [bits(value) for value in candle[1:]]


def test_csv_quotes_the_header_and_the_time_as_before(sql_store):
    store.upsert_candles("binance", "BTC/USDT", "1m", [[T0, 100.0, 101.5, 99.0, 100.5, 2.0]])
    assert export_file("csv").decode() == (
        '"ts","time","open","high","low","close","volume"\n1704067200000,"2024-01-01T00:00:00Z",100.0,101.5,99.0,100.5,2.0\n'
    )


def test_json_values_read_back_bit_for_bit_across_text_slices(sql_store, monkeypatch):
    monkeypatch.setattr(exports, "TEXT_SLICE", 7)
    candles = awkward_candles(30, seed=11)
    store.upsert_candles("binance", "BTC/USDT", "1m", candles)
    lines = export_file("json").decode().splitlines()
    assert len(lines) == 30
    for line, candle in zip(lines, candles, strict=True):
        row = json.loads(line)
        assert list(row) == ["ts", "time", "open", "high", "low", "close", "volume"]
        assert (row["ts"], row["time"]) == (candle[0], format_time(candle[0]))
        assert [bits(row[name]) for name in exports.VALUE_FIELDS] == [bits(value) for value in candle[1:]]


def test_an_empty_csv_export_is_the_header_alone(sql_store):
    store.upsert_candles("binance", "BTC/USDT", "1m", [[T0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    export = exports.request_export(
        exchange_id="binance", symbols=["BTC/USDT"], timeframes=["1m"], start_ts=T0 + MINUTE, format="csv"
    )
    task = Task.objects.filter(pk=export.task_id).claim("test-worker", 60)
    assert run_task(task) == Task.Status.SUCCEEDED
    path = exports.export_path(Export.objects.get(pk=export.pk))
    assert path.read_text() == '"ts","time","open","high","low","close","volume"\n'


def indicator_chunk(extra: list[float | None]) -> pa.Table:
    schema = exports.series_schema(["rsi_14"])
    ts = pa.array([T0 + i * MINUTE for i in range(len(extra))]).cast(exports.TS_TYPE)
    values = [pa.array([1.5] * len(extra)) for _ in exports.VALUE_FIELDS]
    return pa.Table.from_arrays([ts, *values, pa.array(extra, type=pa.float64())], schema=schema)


def test_a_missing_indicator_is_an_empty_csv_field_and_null_in_json():
    table = indicator_chunk([None, 42.25, float("nan")])
    lines = bytes(exports.csv_lines(table)).decode().split("\n")[1:]
    assert [line.rsplit(",", 1)[1] for line in lines] == ["", "42.25", ""]
    objects = [
        json.loads(line) for line in bytes(exports.json_lines(table, exports.text_names(table.schema))).splitlines()
    ]
    assert [row["rsi_14"] for row in objects] == [None, 42.25, None]


def test_an_infinite_indicator_is_written_as_inf_in_csv():
    table = indicator_chunk([float("inf"), None, -float("inf"), 0.5])
    rows = list(csv.reader(io.StringIO(bytes(exports.csv_lines(table)).decode().lstrip("\n"))))
    assert [row[-1] for row in rows] == ["inf", "", "-inf", "0.5"]
    assert [float(row[2]) for row in rows] == [1.5] * 4


def test_iso_times_are_the_apis_text_from_year_1_to_9999():
    rng = np.random.default_rng(3)
    whole = np.sort(rng.integers(0, 253_402_300_799, size=5_000) * 1000)
    assert exports.iso_times(whole).to_pylist() == [format_time(int(ts)) for ts in whole]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for ts in (
        np.sort(rng.integers(-62_135_596_800_000, 253_402_300_799_999, size=5_000)),
        np.array([951_782_400_123]),
    ):
        expected = [(epoch + timedelta(milliseconds=int(value))).isoformat(timespec="milliseconds") for value in ts]
        assert exports.iso_times(ts).to_pylist() == [text.replace("+00:00", "Z") for text in expected]


def test_iso_times_keep_milliseconds_in_a_slice_when_a_candle_has_them_and_frame_the_text():
    text = exports.iso_times(np.array([T0, T0 + 1_500]), b',"', b'"').to_pylist()
    assert text == [',"2024-01-01T00:00:00.000Z"', ',"2024-01-01T00:00:01.500Z"']


def test_iso_times_beyond_year_9999_are_arrows_text():
    assert exports.iso_times(np.array([253_402_300_800_000])).to_pylist() == ["10000-01-01T00:00:00Z"]
