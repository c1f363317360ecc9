"""Coverage API latency over 10,000 series: GET /api/v1/data/coverage answered from the per-series statistics.

Creates the statistics of 10,000 series (20 exchanges x 100 symbols x 5 timeframes) and 2,000 open gaps
in a scratch PostgreSQL database (the embedded store's SeriesStatistics table; no candle is needed, as
the endpoint never reads candles), then times whole requests through Django's test client (middleware,
session auth, DRF, serialisation): the first page (50 series), a page of 1,000, the last page, a
filtered query (one exchange and timeframe) and the admin's stored-series page. Median and p95 of
REPEAT requests each; nothing is asserted (the issue asks for under 50 ms).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dc_bench SECRET_KEY=x .venv/bin/python -m benchmarks coverage

BENCH_COVERAGE_REPEAT (default 50) requests per query.
"""

import os
import statistics
import time

from benchmarks.scratch import scratch_database

EXCHANGES = [f"exchange{i:02d}" for i in range(20)]
SYMBOLS = [f"C{i:03d}/USDT" for i in range(100)]
TIMEFRAMES = ["1m", "5m", "1h", "4h", "1d"]
T0 = 1_704_067_200_000


def main() -> None:
    repeat = int(os.environ.get("BENCH_COVERAGE_REPEAT", "50"))
    with scratch_database("coverage") as name:
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.db import connection
        from django.test import Client
        from django.utils import timezone

        from apps.marketdata.models import Gap, SeriesStatistics
        from apps.marketdata.timeframes import timeframe_ms

        now = timezone.now()
        rows = [
            SeriesStatistics(
                exchange_id=exchange,
                symbol=symbol,
                timeframe=timeframe,
                first_ts=T0,
                last_ts=T0 + 100_000 * timeframe_ms(timeframe),
                candles=99_990,
                anomalies=(i % 7 == 0),
                last_collected_at=now,
            )
            for i, (exchange, symbol, timeframe) in enumerate(
                (e, s, t) for e in EXCHANGES for s in SYMBOLS for t in TIMEFRAMES
            )
        ]
        started = time.perf_counter()
        SeriesStatistics.objects.bulk_create(rows, batch_size=2_000)
        gaps = [
            Gap(
                exchange_id=row.exchange_id,
                symbol=row.symbol,
                timeframe=row.timeframe,
                start_ts=T0 + 10 * timeframe_ms(row.timeframe),
                end_ts=T0 + 19 * timeframe_ms(row.timeframe),
                missing=10,
            )
            for row in rows[::5]
        ]
        Gap.objects.bulk_create(gaps, batch_size=2_000)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
        print(
            f"{len(rows):,} series' statistics and {len(gaps):,} gaps created in {time.perf_counter() - started:.1f}s "
            f"(scratch database {name}); {repeat} requests per query",
            flush=True,
        )

        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]  # the test client's host
        user = get_user_model().objects.create_superuser("bench", password="bench-password-1")
        client = Client()
        client.force_login(user)
        queries = [
            ("first page (50 series)", "/api/v1/data/coverage", {}),
            ("a page of 1,000 series", "/api/v1/data/coverage", {"page_size": 1000}),
            ("last page (50 series)", "/api/v1/data/coverage", {"page": len(rows) // 50}),
            ("filtered: exchange07, 1h", "/api/v1/data/coverage", {"exchange_id": "exchange07", "timeframe": "1h"}),
            ("filtered: one symbol", "/api/v1/data/coverage", {"symbol": "C042/USDT"}),
            ("admin stored-series page (500 series)", "/admin/marketdata/gap/series/", {}),
        ]
        print(f"{'query':40} {'median ms':>10} {'p95 ms':>8} {'series':>7}")
        for label, url, params in queries:
            timings = []
            for _ in range(repeat):
                started = time.perf_counter()
                response = client.get(url, params)
                timings.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise SystemExit(f"{url} answered {response.status_code}: {response.content[:200]!r}")
            shown = len(response.json()["results"]) if url.startswith("/api/") else 500
            p95 = sorted(timings)[max(0, int(len(timings) * 0.95) - 1)]
            print(f"{label:40} {statistics.median(timings):10.1f} {p95:8.1f} {shown:7}", flush=True)
