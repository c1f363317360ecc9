"""Both series endpoints (ohlcv, indicators) parse their query the same way: a 400 names the parameter."""

import pytest

pytestmark = pytest.mark.django_db

SERIES = {"exchange_id": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}
URLS = ["/api/v1/data/ohlcv", "/api/v1/data/indicators"]


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"exchange_id": None}, "exchange_id", "required"),
        ({"symbol": None}, "symbol", "required"),
        ({"timeframe": None}, "timeframe", "required"),
        ({"exchange_id": "nosuchexchange"}, "exchange_id", "Unknown exchange"),
        ({"timeframe": "1minute"}, "timeframe", "not well formed"),
        ({"timeframe": "0m"}, "timeframe", "not well formed"),
        ({"start": "yesterday"}, "start", "not a date"),
        ({"end": "2024-13-01"}, "end", "not a date"),
        ({"start": "2024-01-01T00:00:00 02:00"}, "start", "%2B"),
        ({"start": "2024-01-02", "end": "2024-01-01"}, "start", "after end"),
        ({"limit": "0"}, "limit", "greater than or equal to 1"),
        ({"limit": "10001"}, "limit", "less than or equal to 10000"),
        ({"limit": "many"}, "limit", "valid integer"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_parameter(api_client, sql_store, url, params, field, message):
    query = {**SERIES, **params}
    response = api_client.get(url, {key: value for key, value in query.items() if value is not None})

    assert response.status_code == 400
    assert list(response.json()) == [field]
    assert message in " ".join(response.json()[field])


@pytest.mark.parametrize("url", URLS)
def test_requires_authentication(anon_client, sql_store, url):
    assert anon_client.get(url, SERIES).status_code in (401, 403)
