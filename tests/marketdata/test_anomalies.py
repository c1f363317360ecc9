"""OHLC anomalies: candles breaking an invariant are stored as sent, flagged by the same upsert call,
cleared when a revision fixes them, counted in the series' statistics, listed by the API and the admin.
On PostgreSQL, mongomock-ng (anomalies in the Django database, statistics in MongoDB) and SQLite."""

from django.contrib.auth import get_user_model
from django.urls import reverse
from rest_framework.test import APIClient

from apps.marketdata import store
from apps.marketdata.models import Anomaly
from apps.marketdata.store import UpsertResult
from tests.conftest import grant
from tests.marketdata.conftest import run_on_sqlite

MINUTE = 60_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SERIES = ("binance", "BTC/USDT", "1m")


def candle(i: int, o: float = 100.0, h: float = 102.0, lo: float = 98.0, c: float = 101.0) -> list:
    return [T0 + i * MINUTE, o, h, lo, c, 1.0]


def anomalies() -> list[tuple[int, str]]:
    return sorted(Anomaly.objects.for_series(*SERIES).values_list("ts", "kind"))


def test_the_check_flags_each_broken_invariant():
    rows = [tuple(r) for r in (candle(0), candle(1, h=99.0), candle(2, lo=100.5), candle(3, h=90.0, lo=100.5))]
    assert [(ts, kind) for ts, kind, *_ in store.ohlc_anomalies(rows)] == [
        (T0 + MINUTE, "high_below"),
        (T0 + 2 * MINUTE, "low_above"),
        (T0 + 3 * MINUTE, "high_below"),
        (T0 + 3 * MINUTE, "low_above"),
    ]
    # Equal values are not anomalies: a flat candle is a real candle.
    assert store.ohlc_anomalies([(T0, 5.0, 5.0, 5.0, 5.0, 0.0)]) == []


def test_bad_candles_are_stored_as_sent_and_flagged(db, candle_store):
    rows = [candle(0), candle(1, h=99.5), candle(2, lo=101.5), candle(3)]
    assert store.upsert_candles(*SERIES, rows) == UpsertResult(4, 0, 0)

    assert store.read_candles(*SERIES) == rows
    assert anomalies() == [(T0 + MINUTE, "high_below"), (T0 + 2 * MINUTE, "low_above")]
    flagged = Anomaly.objects.get(ts=T0 + MINUTE)
    assert (flagged.open, flagged.high, flagged.low, flagged.close) == (100.0, 99.5, 98.0, 101.0)
    assert store.statistics(*SERIES).anomalies == 2


def test_sending_the_same_bad_candle_again_counts_it_once(db, candle_store):
    store.upsert_candles(*SERIES, [candle(0), candle(1, h=99.5)])
    assert store.upsert_candles(*SERIES, [candle(0), candle(1, h=99.5)]) == UpsertResult(0, 0, 2)
    store.upsert_candles(*SERIES, [candle(1, h=99.5), candle(2)])  # the upsert path, beside a new candle

    assert anomalies() == [(T0 + MINUTE, "high_below")]
    assert store.statistics(*SERIES).anomalies == 1


def test_a_revision_that_fixes_the_candle_clears_its_anomaly(db, candle_store):
    store.upsert_candles(*SERIES, [candle(0, h=99.0), candle(1, lo=101.5), candle(2, h=99.0)])
    assert store.statistics(*SERIES).anomalies == 3

    # Candle 1 fixed; candle 0 still bad but of the other kind; candle 2 not sent, so left alone.
    assert store.upsert_candles(*SERIES, [candle(0, lo=100.5), candle(1)]) == UpsertResult(0, 2, 0)

    assert anomalies() == [(T0, "low_above"), (T0 + 2 * MINUTE, "high_below")]
    assert store.statistics(*SERIES).anomalies == 2
    assert Anomaly.objects.get(ts=T0).low == 100.5


def test_deleting_candles_deletes_their_anomalies(db, candle_store):
    store.upsert_candles(*SERIES, [candle(0, h=99.0), candle(1), candle(2, h=99.0)])
    store.delete_series(*SERIES, end_ts=T0 + MINUTE)

    assert anomalies() == [(T0 + 2 * MINUTE, "high_below")]
    assert store.statistics(*SERIES).anomalies == 1


def test_the_embedded_sqlite_store_flags_and_clears_anomalies(tmp_path):
    script = """
import json, django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from apps.marketdata import store
from apps.marketdata.models import Anomaly
S = ("binance", "BTC/USDT", "1m")
row = lambda i, h=102.0: [1704067200000 + i * 60000, 100.0, h, 98.0, 101.0, 1.0]
first = store.upsert_candles(*S, [row(0), row(1, h=99.0), row(2, h=99.0)])
flagged = sorted(Anomaly.objects.values_list("ts", flat=True))
second = store.upsert_candles(*S, [row(1), row(2, h=99.0), row(3)])
stats = store.statistics(*S)
print(json.dumps({"first": list(first), "second": list(second), "flagged": flagged,
    "left": list(Anomaly.objects.values_list("ts", flat=True)), "stats": [stats.candles, stats.anomalies]}))
"""
    out = run_on_sqlite(script, tmp_path / "db.sqlite3")
    assert out["first"] == [3, 0, 0]
    assert out["second"] == [1, 1, 1]
    assert out["flagged"] == [T0 + MINUTE, T0 + 2 * MINUTE]
    assert out["left"] == [T0 + 2 * MINUTE]
    assert out["stats"] == [4, 1]


def test_the_api_lists_anomalies_with_filters(api_client, sql_store):
    store.upsert_candles(*SERIES, [candle(0, h=99.0), candle(1, lo=101.5)])
    store.upsert_candles("binance", "ETH/USDT", "1m", [candle(0, h=99.0)])

    response = api_client.get("/api/v1/data/anomalies", {"symbol": "BTC/USDT", "kind": "low_above"})

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 1
    row = body["results"][0]
    assert (row["symbol"], row["ts"], row["time"], row["kind"]) == (
        "BTC/USDT",
        T0 + MINUTE,
        "2024-01-01T00:01:00Z",
        "low_above",
    )
    assert (row["open"], row["high"], row["low"], row["close"]) == (100.0, 102.0, 101.5, 101.0)
    assert api_client.get("/api/v1/data/anomalies").json()["count"] == 3


def test_the_api_refuses_an_unknown_kind_and_needs_the_view_permission(api_client, sql_store):
    response = api_client.get("/api/v1/data/anomalies", {"kind": "sideways"})
    assert response.status_code == 400
    assert "kind" in response.json()

    nobody = APIClient()
    nobody.force_authenticate(get_user_model().objects.create_user("nobody"))
    assert nobody.get("/api/v1/data/anomalies").status_code == 403
    viewer = APIClient()
    viewer.force_authenticate(grant(get_user_model().objects.create_user("viewer"), "view_anomaly"))
    assert viewer.get("/api/v1/data/anomalies").status_code == 200


def test_the_admin_lists_anomalies(admin_client, sql_store):
    store.upsert_candles(*SERIES, [candle(0, h=99.0)])

    response = admin_client.get(reverse("admin:marketdata_anomaly_changelist"))

    assert response.status_code == 200
    assert "high below open, close or low" in response.content.decode()
    assert admin_client.get(reverse("admin:marketdata_anomaly_add")).status_code == 403
