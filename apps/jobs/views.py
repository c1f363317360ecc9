import django_filters
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema
from rest_framework import filters, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.jobs.models import Job, Run
from apps.jobs.serializers import BulkJobSerializer, JobSerializer, RunSerializer


class JobFilter(django_filters.FilterSet):
    exchange_id = django_filters.CharFilter(field_name="connector__exchange_id")

    class Meta:
        model = Job
        fields = ["exchange_id", "symbol", "timeframe", "status", "connector"]


class JobViewSet(viewsets.ModelViewSet):
    """Collection jobs: one per series (exchange, symbol, timeframe)."""

    queryset = Job.objects.select_related("connector")
    serializer_class = JobSerializer
    filter_backends = [DjangoFilterBackend, filters.SearchFilter, filters.OrderingFilter]
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

    @extend_schema(request=BulkJobSerializer, responses={201: JobSerializer(many=True)})
    @action(detail=False, methods=["post"])
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


class RunFilter(django_filters.FilterSet):
    exchange_id = django_filters.CharFilter(field_name="job__connector__exchange_id")
    symbol = django_filters.CharFilter(field_name="job__symbol")
    timeframe = django_filters.CharFilter(field_name="job__timeframe")
    started_after = django_filters.IsoDateTimeFilter(field_name="started_at", lookup_expr="gte")
    started_before = django_filters.IsoDateTimeFilter(field_name="started_at", lookup_expr="lt")

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
