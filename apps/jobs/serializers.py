from datetime import UTC, datetime

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.utils.dateparse import parse_date
from rest_framework import serializers
from rest_framework.reverse import reverse
from rest_framework.settings import api_settings

from apps.connectors.models import Connector, Market
from apps.connectors.serializers import full_clean_or_400
from apps.jobs.models import Job, Run, Task, validate_symbol, validate_timeframe
from apps.marketdata.timeframes import ms_to_datetime

# Statuses an operator may set; `error` is the collector's verdict, cleared by resuming.
SETTABLE_STATUSES = [Job.Status.ACTIVE, Job.Status.PAUSED]

# Epoch values below this are almost surely seconds, not milliseconds (it is March 1973 in ms).
_MIN_EPOCH_MS = 10**11

MAX_BULK_SYMBOLS = 500
MAX_BULK_TIMEFRAMES = 20


class SinceField(serializers.DateTimeField):
    """A history start given as ISO 8601 (date or date-time; naive means UTC) or epoch milliseconds."""

    default_error_messages = {
        "invalid": (
            "since must be an ISO 8601 date or date-time (e.g. 2024-01-01 or 2024-01-01T00:00:00Z) "
            "or epoch milliseconds (e.g. 1704067200000)."
        ),
        "seconds": "since {value} looks like epoch seconds; send epoch milliseconds ({value}000).",
    }

    def to_internal_value(self, value: object) -> datetime:
        if isinstance(value, bool):
            self.fail("invalid")
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            ms = int(value)
            if ms < _MIN_EPOCH_MS:
                self.fail("seconds", value=ms)
            try:
                result = ms_to_datetime(ms)
            except (OverflowError, OSError, ValueError):
                self.fail("invalid")
        elif isinstance(value, str) and (day := _parse_date(value)) is not None:
            result = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            result = super().to_internal_value(value)
        return result


def _parse_date(value: str):
    try:
        return parse_date(value.strip())
    except ValueError:
        return None


def _connector_or_400(exchange_id: str) -> Connector:
    try:
        return Connector.objects.for_exchange(exchange_id)
    except DjangoValidationError as exc:
        raise serializers.ValidationError({"exchange_id": exc.messages}) from None


class JobSerializer(serializers.HyperlinkedModelSerializer):
    exchange_id = serializers.CharField(
        max_length=64, help_text="Exchange of the series; a connector for it must exist (GET /api/v1/exchanges)."
    )
    since = SinceField(
        required=False,
        allow_null=True,
        help_text="History start: ISO 8601 or epoch milliseconds. Empty: the most recent candles only.",
    )
    status = serializers.ChoiceField(choices=SETTABLE_STATUSES, required=False)
    cursor_at = serializers.SerializerMethodField(help_text="The cursor as an ISO 8601 UTC date-time.")
    runs = serializers.SerializerMethodField(help_text="This job's run history.")

    class Meta:
        model = Job
        fields = [
            "id",
            "url",
            "exchange_id",
            "symbol",
            "timeframe",
            "since",
            "status",
            "connector",
            "cursor",
            "cursor_at",
            "next_run_at",
            "lease_owner",
            "lease_expires_at",
            "last_error",
            "consecutive_failures",
            "last_run_at",
            "last_success_at",
            "created_at",
            "updated_at",
            "runs",
        ]
        read_only_fields = [
            "connector",
            "cursor",
            "next_run_at",
            "lease_owner",
            "lease_expires_at",
            "last_error",
            "consecutive_failures",
            "last_run_at",
            "last_success_at",
            "created_at",
            "updated_at",
        ]
        # Job.full_clean() checks the unique series with a message naming it; no DRF duplicate of that rule.
        validators = []

    def get_cursor_at(self, job: Job) -> datetime | None:
        return None if job.cursor is None else ms_to_datetime(job.cursor)

    def get_runs(self, job: Job) -> str | None:
        request = self.context.get("request")
        if request is None:
            return None
        return f"{reverse('run-list', request=request)}?job={job.pk}"

    def validate(self, attrs: dict) -> dict:
        if "exchange_id" in attrs:
            exchange_id = attrs.pop("exchange_id")
            if self.instance is not None and exchange_id != self.instance.connector.exchange_id:
                # Job.clean() would say the same, but only once a connector for the new id exists.
                raise serializers.ValidationError(
                    {"exchange_id": ["exchange_id cannot be changed after creation; create another job instead."]}
                )
            attrs["connector"] = _connector_or_400(exchange_id)
        instance = self.instance if self.instance is not None else Job()
        for name, value in attrs.items():
            if name != "status":  # Status changes go through pause()/resume(), see update().
                setattr(instance, name, value)
        full_clean_or_400(instance, rename={"connector": "exchange_id"})
        return attrs

    def create(self, validated_data: dict) -> Job:
        try:
            with transaction.atomic():
                return super().create(validated_data)
        except IntegrityError:
            raise serializers.ValidationError(
                {api_settings.NON_FIELD_ERRORS_KEY: [f"A job for {_series_name(validated_data)} already exists."]}
            ) from None

    def update(self, job: Job, validated_data: dict) -> Job:
        status = validated_data.pop("status", None)
        job = super().update(job, validated_data)
        if status == Job.Status.PAUSED and job.status != Job.Status.PAUSED:
            job.pause()
        elif status == Job.Status.ACTIVE and job.status != Job.Status.ACTIVE:
            job.resume()
        return job


def _series_name(data: dict) -> str:
    return f"{data['connector'].exchange_id} {data['symbol']} {data['timeframe']}"


class BulkJobSerializer(serializers.Serializer):
    """symbols x timeframes of one exchange, created together or not at all."""

    exchange_id = serializers.CharField(max_length=64)
    symbols = serializers.ListField(
        child=serializers.CharField(max_length=64), allow_empty=False, max_length=MAX_BULK_SYMBOLS
    )
    timeframes = serializers.ListField(
        child=serializers.CharField(max_length=8), allow_empty=False, max_length=MAX_BULK_TIMEFRAMES
    )
    since = SinceField(required=False, allow_null=True)
    status = serializers.ChoiceField(choices=SETTABLE_STATUSES, default=Job.Status.ACTIVE)

    def validate(self, attrs: dict) -> dict:
        connector = _connector_or_400(attrs["exchange_id"])
        errors: dict[str, list[str]] = {}
        malformed: set[str] = set()
        for field, validate in (
            ("symbols", validate_symbol),
            ("timeframes", lambda value: validate_timeframe(value, connector.exchange_id)),
        ):
            seen: set[str] = set()
            for value in attrs[field]:
                if value in seen:
                    errors.setdefault(field, []).append(f"{value!r} is listed twice.")
                seen.add(value)
                try:
                    validate(value)
                except DjangoValidationError as exc:
                    errors.setdefault(field, []).extend(exc.messages)
                    malformed.add(value)
        well_formed = [symbol for symbol in dict.fromkeys(attrs["symbols"]) if symbol not in malformed]
        listing = Market.objects.listing_errors(connector.exchange_id, well_formed)
        if listing:
            errors.setdefault("symbols", []).extend(listing.values())
        if errors:
            raise serializers.ValidationError(errors)
        existing = (
            Job.objects.filter(connector=connector, symbol__in=attrs["symbols"], timeframe__in=attrs["timeframes"])
            .order_by("symbol", "timeframe")
            .values_list("symbol", "timeframe")
        )
        if existing:
            raise serializers.ValidationError(
                {
                    api_settings.NON_FIELD_ERRORS_KEY: [
                        f"These jobs already exist, so nothing was created: "
                        f"{', '.join(f'{connector.exchange_id} {s} {t}' for s, t in existing)}."
                    ]
                }
            )
        attrs["connector"] = connector
        return attrs

    def create(self, validated_data: dict) -> list[Job]:
        jobs = [
            Job(
                connector=validated_data["connector"],
                symbol=symbol,
                timeframe=timeframe,
                since=validated_data.get("since"),
                status=validated_data["status"],
            )
            for symbol in validated_data["symbols"]
            for timeframe in validated_data["timeframes"]
        ]
        try:
            with transaction.atomic():
                return Job.objects.bulk_create(jobs)
        except IntegrityError:
            raise serializers.ValidationError(
                {
                    api_settings.NON_FIELD_ERRORS_KEY: [
                        "Another request created some of these jobs meanwhile; nothing was created."
                    ]
                }
            ) from None


class RunSerializer(serializers.HyperlinkedModelSerializer):
    exchange_id = serializers.CharField(source="job.connector.exchange_id", read_only=True)
    symbol = serializers.CharField(source="job.symbol", read_only=True)
    timeframe = serializers.CharField(source="job.timeframe", read_only=True)
    duration = serializers.FloatField(read_only=True, allow_null=True, help_text="Seconds; null while running.")

    class Meta:
        model = Run
        fields = [
            "id",
            "url",
            "job",
            "exchange_id",
            "symbol",
            "timeframe",
            "status",
            "worker",
            "started_at",
            "finished_at",
            "duration",
            "candles_fetched",
            "candles_written",
            "requests",
            "rate_limit_wait",
            "error",
        ]
        read_only_fields = fields


class TaskSerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.get_username", read_only=True, allow_null=True, default=None)

    class Meta:
        model = Task
        fields = [
            "id",
            "kind",
            "status",
            "params",
            "progress",
            "message",
            "result",
            "error",
            "attempts",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields
