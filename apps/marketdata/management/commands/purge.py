"""Apply the retention periods: show what would be deleted (the default), or delete it with --yes."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from apps.marketdata.retention import purge
from apps.marketdata.serializers import format_time


class Command(BaseCommand):
    help = (
        "Delete candles older than their retention period (collector.yaml retention.days per timeframe, "
        "or the connector's retention_days), with their indicator rows, anomalies and gaps. "
        "Dry run by default: prints what would go; --yes deletes."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--yes", action="store_true", help="Delete (without it, only print what would go).")

    def handle(self, *args: Any, **options: Any) -> None:
        done = purge(dry_run=not options["yes"])
        verb = "deleted" if options["yes"] else "would delete"
        for item in done:
            series = f"{item.exchange_id} {item.symbol} {item.timeframe}"
            detail = f"{item.candles} candles before {format_time(item.cutoff_ts)} (keep {item.days} days)"
            if options["yes"]:
                detail += f", {item.indicators} indicator rows, {item.gaps} gaps"
            self.stdout.write(f"{series}: {verb} {detail}")
        total = sum(item.candles for item in done)
        summary = f"{verb} {total} candles in {len(done)} series"
        self.stdout.write(summary if options["yes"] or not done else f"{summary} (dry run: --yes deletes)")
