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
        ({"limit": "99999999999999999999"}, "limit", "less than or equal to 10000"),
        ({"start": "253402300800000"}, "start", "after year 9999"),
        ({"end": "9" * 5000}, "end", "9999-12-31T23:59:59.999Z (253402300799999)"),
        ({"start": "9999-12-31T23:00:00-05:00"}, "start", "after year 9999"),
        ({"end": "1969-12-31T23:59:59Z"}, "end", "from 1970-01-01T00:00:00Z (0)"),
        ({"start": "0001-01-01T00:00:00+05:00"}, "start", "before 1970-01-01"),
        ({"symbol": "BTC/USDT\x00"}, "symbol", "Null characters"),
        ({"start": "2024\x00"}, "start", "not a date"),
        ({"format": "xml"}, "format", "is not offered: use json"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_parameter(api_client, sql_store, url, params, field, message):
    query = {**SERIES, **params}
    response = api_client.get(url, {key: value for key, value in query.items() if value is not None})

    assert response.status_code == 400
    assert list(response.json()) == [field]
    assert message in " ".join(response.json()[field])


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("csv", [False, True])
def test_start_after_end_beyond_year_9999_is_a_400_naming_start(api_client, sql_store, url, csv):
    # The message shows both times: a start past year 9999 must be refused before it is formatted.
    query = {**SERIES, "start": "253402300800000", "end": "1", **({"format": "csv"} if csv else {})}

    response = api_client.get(url, query)

    assert response.status_code == 400
    assert "start" in response.content.decode()


@pytest.mark.parametrize("url", URLS)
def test_the_last_millisecond_of_year_9999_is_accepted(api_client, sql_store, url):
    response = api_client.get(url, {**SERIES, "start": "9999-12-31T23:59:59.999Z", "end": "253402300799999"})

    assert response.status_code == 200
    assert response.json()["results"] == []


@pytest.mark.parametrize("url", URLS)
def test_requires_authentication(anon_client, sql_store, url):
    assert anon_client.get(url, SERIES).status_code in (401, 403)
