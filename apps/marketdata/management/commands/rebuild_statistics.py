"""Recompute every series' statistics and anomalies from the stored candles."""

from typing import Any

from django.core.management.base import BaseCommand

from apps.marketdata import store


class Command(BaseCommand):
    help = (
        "Recompute the per-series statistics (coverage) and the OHLC anomalies from the stored candles: a pass "
        "over every candle. For a MongoDB store filled before statistics existed; the store keeps them current."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        series = store.rebuild_statistics()
        self.stdout.write(f"statistics rebuilt for {series} series ({store.backend_name()} store)")
