from django.core.exceptions import NON_FIELD_ERRORS
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, models, transaction
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied
from rest_framework.settings import api_settings

from apps.connectors.models import Connector, Market


def full_clean_or_400(instance: models.Model, rename: dict[str, str] | None = None) -> None:
    """Run the model's own validation (the rules the admin forms use too) and report it as a DRF 400.

    `rename` maps model field names to the API's names (a job's `connector` is `exchange_id` in the API).
    """
    try:
        instance.full_clean()
    except DjangoValidationError as exc:
        errors: dict[str, list[str]] = {}
        for field, messages in exc.message_dict.items():
            key = api_settings.NON_FIELD_ERRORS_KEY if field == NON_FIELD_ERRORS else (rename or {}).get(field, field)
            errors.setdefault(key, []).extend(messages)
        raise serializers.ValidationError(errors) from None


class ConnectorSerializer(serializers.HyperlinkedModelSerializer):
    # Declared explicitly so DRF adds no validators of its own: Connector.full_clean() is the one place
    # the rules live (unique exchange id, known exchange, positive limits, JSON-object options).
    exchange_id = serializers.CharField(
        max_length=64, help_text="A ccxt exchange id (GET /api/v1/exchanges lists them) or 'simulated'."
    )
    options = serializers.JSONField(
        required=False, help_text="A JSON object of ccxt constructor options (urls, sandbox, timeout, options)."
    )
    rate_limit_weight_per_minute = serializers.IntegerField(
        required=False, allow_null=True, help_text="Positive; null: the default from collector.yaml."
    )
    rate_limit_burst = serializers.IntegerField(
        required=False, allow_null=True, help_text="Positive; null: the default from collector.yaml."
    )
    job_count = serializers.SerializerMethodField()

    class Meta:
        model = Connector
        fields = [
            "id",
            "url",
            "exchange_id",
            "name",
            "enabled",
            "options",
            "rate_limit_weight_per_minute",
            "rate_limit_burst",
            "retention_days",
            "api_key_env",
            "api_secret_env",
            "api_password_env",
            "job_count",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]

    def get_job_count(self, connector: Connector) -> int:
        # The list view annotates it; a freshly created or updated connector counts on demand.
        count = getattr(connector, "job_count", None)
        return connector.jobs.count() if count is None else count

    def validate(self, attrs: dict) -> dict:
        instance = self.instance if self.instance is not None else Connector()
        if "options" in attrs:
            # A 403, not a 400: the options are valid, this user may not point the connector elsewhere.
            # Checked against the stored options, before the instance takes the new ones below.
            request = self.context.get("request")
            error = instance.urls_permission_error(getattr(request, "user", None), attrs["options"])
            if error is not None:
                raise PermissionDenied(error)
        for name, value in attrs.items():
            setattr(instance, name, value)
        full_clean_or_400(instance)
        return attrs

    def create(self, validated_data: dict) -> Connector:
        # full_clean() saw no duplicate, but a concurrent request may have won the race since.
        try:
            with transaction.atomic():
                return super().create(validated_data)
        except IntegrityError:
            raise serializers.ValidationError(
                {"exchange_id": [f"A connector for exchange {validated_data['exchange_id']!r} already exists."]}
            ) from None


class RefreshResultSerializer(serializers.Serializer):
    exchange_id = serializers.CharField()
    total = serializers.IntegerField(help_text="Markets the exchange lists now.")
    added = serializers.IntegerField()
    updated = serializers.IntegerField()
    delisted = serializers.IntegerField(help_text="Stored markets the exchange no longer lists (kept, inactive).")
    relisted = serializers.IntegerField(help_text="Delisted markets listed again.")
    jobs_stopped = serializers.IntegerField(help_text="Active jobs stopped because their market is gone or inactive.")


class MarketSerializer(serializers.ModelSerializer):
    class Meta:
        model = Market
        fields = [
            "symbol",
            "market_id",
            "base",
            "quote",
            "settle",
            "type",
            "active",
            "precision",
            "limits",
            "first_seen",
            "last_seen",
            "delisted_at",
        ]
        read_only_fields = fields
