from django.apps import AppConfig


class MarketdataConfig(AppConfig):
    name = "apps.marketdata"
