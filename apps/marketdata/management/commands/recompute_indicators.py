"""`manage.py recompute_indicators`: rebuild the stored indicators of an exchange's series from their candles.

Run it after changing `indicators` in the collector YAML: every row of the chosen series ends up with
exactly the configured columns (columns no longer configured disappear; rows already holding exactly
the recomputed values are not rewritten), and rows whose candle no longer exists are deleted.
Collection keeps indicators current on its own; this is for config changes and repairs. Safe beside a
running scheduler: both write the same values for the same candles.
"""

import sys
import time

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from apps.marketdata import store
from apps.marketdata.indicators import SeriesSelectionError, indicator_set, recompute_series, stored_series
from datacollector.config import ConfigError

# The option naming each field of a selection (stored_series).
OPTIONS = {
    "exchange_id": "--exchange",
    "symbols": "--symbol",
    "timeframes": "--timeframe",
    "series": "--symbol and --timeframe",
}


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class Command(BaseCommand):
    help = "Recompute the stored indicators of one exchange's series (all, or the given symbols and timeframes)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--exchange", required=True, help="Exchange id whose stored series to recompute.")
        parser.add_argument("--symbol", help="Only these ccxt symbols, comma-separated (BTC/USDT,ETH/USDT).")
        parser.add_argument("--timeframe", help="Only these timeframes, comma-separated (1m,1h).")

    def handle(self, *args, **options) -> None:
        try:
            indicators = indicator_set()
        except ConfigError as error:
            raise CommandError(f"collector configuration: {error}") from None
        series = self.select_series(options)

        started = time.monotonic()
        bar = tqdm(
            total=sum(s.candles for s in series),
            unit=" candles",
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=options["verbosity"] == 0,
            desc=f"{options['exchange']} indicators",
        )
        rows = 0
        for s in series:
            bar.set_postfix_str(f"{s.symbol} {s.timeframe}")
            rows += recompute_series(s.exchange_id, s.symbol, s.timeframe, indicators.config)
            bar.update(s.candles)
        bar.close()
        self.stdout.write(
            f"Recomputed {len(series)} series ({rows} rows) in {time.monotonic() - started:.1f}s; "
            f"columns: {', '.join(indicators.names)}"
        )

    def select_series(self, options: dict) -> list[store.SeriesCoverage]:
        """The stored series matching the options; every option that matches nothing is an error naming it."""
        try:
            return stored_series(options["exchange"].strip(), _split(options["symbol"]), _split(options["timeframe"]))
        except SeriesSelectionError as error:
            raise CommandError(f"{OPTIONS[error.field]} {error.message}") from None
