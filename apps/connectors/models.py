from django.core.exceptions import ValidationError
from django.db import models

from datacollector.config import get_config


def validate_options(value: object) -> None:
    if not isinstance(value, dict):
        raise ValidationError("options must be a JSON object (the keyword arguments of the ccxt exchange constructor).")


class Connector(models.Model):
    """One exchange the collector talks to; `options` go to the ccxt constructor unchanged."""

    exchange_id = models.CharField(
        max_length=64,
        unique=True,
        help_text="A ccxt exchange id (e.g. binance, kraken) or 'simulated' for the offline exchange.",
    )
    name = models.CharField(max_length=100, blank=True)
    enabled = models.BooleanField(default=True)
    options = models.JSONField(
        default=dict,
        blank=True,
        validators=[validate_options],
        help_text="Keyword arguments for the ccxt exchange constructor: urls, sandbox, timeout, options…",
    )
    rate_limit_weight_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Request weight allowed per minute. Blank: the default from collector.yaml."
    )
    rate_limit_burst = models.PositiveIntegerField(
        null=True, blank=True, help_text="Bucket capacity (burst). Blank: the default from collector.yaml."
    )
    api_key_env = models.CharField(
        max_length=100, blank=True, help_text="Name of the environment variable holding the API key (never the key)."
    )
    api_secret_env = models.CharField(
        max_length=100, blank=True, help_text="Name of the environment variable holding the API secret."
    )
    api_password_env = models.CharField(
        max_length=100, blank=True, help_text="Name of the environment variable holding the API passphrase, if any."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["exchange_id"]

    def __str__(self) -> str:
        return self.name or self.exchange_id

    def save(self, *args, **kwargs) -> None:
        defaults = get_config().rate_limit_for(self.exchange_id)
        if self.rate_limit_weight_per_minute is None:
            self.rate_limit_weight_per_minute = defaults.weight_per_minute
        if self.rate_limit_burst is None:
            self.rate_limit_burst = defaults.burst
        super().save(*args, **kwargs)

    def start(self) -> int:
        """Enable the connector and activate all its jobs; returns how many jobs were touched."""
        Connector.objects.filter(pk=self.pk).update(enabled=True)
        self.enabled = True
        return self.jobs.all().resume()

    def stop(self) -> int:
        """Pause all the connector's jobs (they keep their cursors); returns how many were touched."""
        return self.jobs.all().pause()

    @property
    def refill_per_second(self) -> float:
        return (self.rate_limit_weight_per_minute or 0) / 60.0
