"""Export stored candles in the foreground, with a progress bar: `manage.py export --exchange-id binance
--symbols BTC/USDT --timeframes 1m --format parquet [--start 2024-01-01] [--end ...] [--indicators]`.

The same export as `POST /api/v1/data/export` (an Export row and its task, recorded as it goes), written
by this process instead of a scheduler; prints the file's path.
"""

import os
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from apps.jobs.models import Task
from apps.marketdata import exports
from apps.marketdata.serializers import parse_time_ms

# The flag of each field validate_export may name.
FLAGS = {
    "exchange_id": "--exchange-id",
    "symbols": "--symbols",
    "timeframes": "--timeframes",
    "start": "--start",
    "end": "--end",
    "format": "--format",
    "indicators": "--indicators",
}


class Command(BaseCommand):
    help = "Export stored candles to a CSV, JSON Lines, Parquet or freqtrade file now, with a progress bar."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--exchange-id", required=True, help="ccxt exchange id, e.g. binance.")
        parser.add_argument("--symbols", required=True, nargs="+", help="One or more symbols, e.g. BTC/USDT ETH/USDT.")
        parser.add_argument("--timeframes", required=True, nargs="+", help="One or more timeframes, e.g. 1m 1h.")
        parser.add_argument("--format", required=True, help=f"One of {', '.join(exports.FORMATS)}.")
        parser.add_argument("--start", help="First candle open time: epoch ms or ISO 8601 (UTC). Default: oldest.")
        parser.add_argument("--end", help="Last candle open time: epoch ms or ISO 8601 (UTC). Default: newest.")
        parser.add_argument("--indicators", action="store_true", help="Add one column per configured indicator.")

    def handle(self, *args: Any, **options: Any) -> None:
        bounds = {}
        for name in ("start", "end"):
            try:
                bounds[name] = parse_time_ms(options[name], name) if options[name] is not None else None
            except ValueError as exc:
                raise CommandError(f"{FLAGS[name]}: {exc}") from None
        try:
            export = exports.request_export(
                exchange_id=options["exchange_id"],
                symbols=options["symbols"],
                timeframes=options["timeframes"],
                start_ts=bounds["start"],
                end_ts=bounds["end"],
                format=options["format"],
                indicators=options["indicators"],
            )
        except ValidationError as exc:
            errors = exc.message_dict if hasattr(exc, "error_dict") else {"range": exc.messages}
            raise CommandError(
                "; ".join(f"{FLAGS.get(field, '--start/--end')}: {' '.join(texts)}" for field, texts in errors.items())
            ) from None
        # Claimed by this process, so no scheduler writes it too; its progress shows in the API meanwhile.
        task = Task.objects.filter(pk=export.task_id).claim(f"export-command:{os.getpid()}", lease_seconds=300)
        if task is None:
            raise CommandError(f"export {export.pk} was taken by a scheduler first; follow it in the API")
        with tqdm(total=100, unit="%", disable=options["verbosity"] == 0) as bar:

            def show(share: float, message: str) -> None:
                bar.set_description(message)
                bar.update(round(share * 100) - bar.n)

            try:
                result = exports.run_export_task(task, show)
            except Exception as exc:
                task.fail(f"{type(exc).__name__}: {exc}")
                raise CommandError(f"export {export.pk} failed: {type(exc).__name__}: {exc}") from exc
            task.succeed(result)
            bar.update(100 - bar.n)
        export.refresh_from_db()
        self.stdout.write(f"{exports.export_path(export)}  ({export.rows:,} candles, {export.size:,} bytes)")
