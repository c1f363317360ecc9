from datetime import datetime, timedelta

import django_filters
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django_filters.fields import IsoDateTimeField
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import OpenApiExample, extend_schema, extend_schema_view
from rest_framework import filters, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.jobs.models import Job, Run, Task
from apps.jobs.serializers import BulkJobSerializer, JobSerializer, RunSerializer, TaskSerializer
from datacollector.filters import SearchFilter


class JobFilter(django_filters.FilterSet):
    exchange_id = django_filters.CharFilter(field_name="connector__exchange_id")

    class Meta:
        model = Job
        fields = ["exchange_id", "symbol", "timeframe", "status", "connector"]


@extend_schema_view(
    create=extend_schema(
        examples=[
            OpenApiExample(
                "A series with history",
                value={"exchange_id": "simulated", "symbol": "ETH/USDT", "timeframe": "1h", "since": "2024-01-01"},
                request_only=True,
            )
        ]
    ),
    partial_update=extend_schema(
        examples=[OpenApiExample("Pause", value={"status": "paused"}, request_only=True)],
    ),
)
class JobViewSet(viewsets.ModelViewSet):
    """Collection jobs: one per series (exchange, symbol, timeframe)."""

    queryset = Job.objects.select_related("connector")
    serializer_class = JobSerializer
    filter_backends = [DjangoFilterBackend, SearchFilter, filters.OrderingFilter]
    filterset_class = JobFilter
    search_fields = ["symbol", "connector__exchange_id"]
    ordering_fields = [
        "symbol",
        "timeframe",
        "status",
        "next_run_at",
        "last_run_at",
        "last_success_at",
        "consecutive_failures",
        "created_at",
    ]

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str | None = None) -> Response:
        """Stop collecting this series; the cursor is kept."""
        job = self.get_object()
        job.pause()
        return Response(self.get_serializer(job).data)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        """Activate, clear the error state, and run at once if the next run was further away."""
        job = self.get_object()
        job.resume()
        return Response(self.get_serializer(job).data)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"], url_path="run-now", url_name="run-now")
    def run_now(self, request: Request, pk: str | None = None) -> Response:
        """Activate and make the job due now."""
        job = self.get_object()
        job.run_now()
        return Response(self.get_serializer(job).data)

    @extend_schema(
        request=BulkJobSerializer,
        responses={201: JobSerializer(many=True)},
        examples=[
            OpenApiExample(
                "Two symbols on two timeframes",
                value={"exchange_id": "simulated", "symbols": ["ETH/USDT", "SOL/USDT"], "timeframes": ["1m", "1h"]},
                request_only=True,
            )
        ],
    )
    # Not a list: no filters, search or paging apply to it (nor appear in its schema).
    @action(detail=False, methods=["post"], filter_backends=[], pagination_class=None)
    def bulk(self, request: Request) -> Response:
        """Create symbols x timeframes of one exchange in one transaction: all of them or none."""
        serializer = BulkJobSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        jobs = serializer.save()
        jobs = self.get_queryset().filter(pk__in=[job.pk for job in jobs])
        data = JobSerializer(jobs, many=True, context=self.get_serializer_context()).data
        return Response(data, status=status.HTTP_201_CREATED)

    def get_serializer_class(self) -> type:
        # The browsable API's form for the bulk action shows the bulk fields.
        return BulkJobSerializer if self.action == "bulk" else JobSerializer


# PostgreSQL refuses a timestamp whose UTC offset is 16 hours or more (real ones span -12:00 to +14:00).
_MAX_UTC_OFFSET = timedelta(hours=16)


class MomentField(IsoDateTimeField):
    """An ISO 8601 date-time whose UTC offset the database can store; naive means the server's UTC."""

    # django-filter %-formats the messages it reports, hence the doubled %.
    default_error_messages = {
        "invalid": (
            "Enter an ISO 8601 date-time, e.g. 2024-01-01T00:00:00Z or 2024-01-01T02:00:00+02:00 "
            "(write a '+' offset as %%2B in a URL)."
        ),
        "offset": "The UTC offset {offset} is out of range: use one from -15:59 to +15:59, or Z.",
    }

    def to_python(self, value: object) -> datetime | None:
        moment = super().to_python(value)
        offset = moment.utcoffset() if moment is not None else None
        if offset is not None and abs(offset) >= _MAX_UTC_OFFSET:
            sign, minutes = ("-" if offset < timedelta(0) else "+"), int(abs(offset).total_seconds()) // 60
            raise ValidationError(
                self.error_messages["offset"].format(offset=f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"),
                code="offset",
            )
        return moment


class MomentFilter(django_filters.IsoDateTimeFilter):
    field_class = MomentField


class RunFilter(django_filters.FilterSet):
    exchange_id = django_filters.CharFilter(field_name="job__connector__exchange_id")
    symbol = django_filters.CharFilter(field_name="job__symbol")
    timeframe = django_filters.CharFilter(field_name="job__timeframe")
    started_after = MomentFilter(field_name="started_at", lookup_expr="gte")
    started_before = MomentFilter(field_name="started_at", lookup_expr="lt")

    class Meta:
        model = Run
        fields = ["job", "status", "exchange_id", "symbol", "timeframe", "worker"]


class RunViewSet(viewsets.ReadOnlyModelViewSet):
    """Every collection attempt, newest first."""

    queryset = Run.objects.select_related("job__connector")
    serializer_class = RunSerializer
    filter_backends = [DjangoFilterBackend, filters.OrderingFilter]
    filterset_class = RunFilter
    ordering_fields = ["started_at", "finished_at", "candles_fetched", "candles_written", "requests", "rate_limit_wait"]


class TaskViewSet(viewsets.ReadOnlyModelViewSet):
    """Background work (exports, indicator recomputes, purges, market refreshes): what to poll after a 202.
    Users see the tasks they queued; staff see every task."""

    queryset = Task.objects.select_related("created_by")
    serializer_class = TaskSerializer
    filter_backends = [DjangoFilterBackend, filters.OrderingFilter]
    filterset_fields = ["kind", "status"]
    ordering_fields = ["created_at", "finished_at"]

    def get_queryset(self) -> QuerySet:
        tasks = super().get_queryset()
        user = self.request.user
        return tasks if user.is_staff or user.is_superuser else tasks.filter(created_by=user)
