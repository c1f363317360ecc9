from datetime import timedelta

from django.core.management.base import BaseCommand
from django.utils import timezone

from apps.connectors.exchanges import SIMULATED
from apps.connectors.models import Connector
from apps.jobs.models import Job

DEMO_SYMBOLS = ("BTC/USDT", "ETH/USDT")
# A short history per timeframe, so that a fresh install has charts within seconds, not hours.
DEMO_HISTORY = {"1m": timedelta(hours=6), "1h": timedelta(days=7)}


class Command(BaseCommand):
    help = (
        "Create the demo: a connector on the offline 'simulated' exchange and active jobs for "
        f"{', '.join(DEMO_SYMBOLS)} on {', '.join(DEMO_HISTORY)}. Existing rows are left as they are."
    )

    def handle(self, *args, **options) -> None:
        now = timezone.now()
        connector, created = Connector.objects.get_or_create(
            exchange_id=SIMULATED, defaults={"name": "Simulated exchange (demo)"}
        )
        self.stdout.write(f"Connector {connector.exchange_id}: {'created' if created else 'exists'}.")
        new_jobs = 0
        for symbol in DEMO_SYMBOLS:
            for timeframe, history in DEMO_HISTORY.items():
                _, created = Job.objects.get_or_create(
                    connector=connector,
                    symbol=symbol,
                    timeframe=timeframe,
                    defaults={"since": now - history, "status": Job.Status.ACTIVE},
                )
                new_jobs += created
        self.stdout.write(self.style.SUCCESS(f"Demo jobs: {new_jobs} created, {connector.jobs.count()} in total."))
