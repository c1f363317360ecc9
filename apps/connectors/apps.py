from django.apps import AppConfig
from django.core.exceptions import ImproperlyConfigured


class ConnectorsConfig(AppConfig):
    name = "apps.connectors"

    def ready(self) -> None:
        # Validate the collector configuration at start-up, so a bad file stops every entry point
        # (web, scheduler, commands) with a message naming the key instead of failing mid-run.
        from datacollector.config import ConfigError, get_config

        try:
            get_config()
        except ConfigError as exc:
            raise ImproperlyConfigured(f"Invalid collector configuration: {exc}") from None
