from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "apps.monitoring"

    def ready(self) -> None:
        from apps.monitoring import metrics

        metrics.register()
