import json

import pytest

from datacollector.parsers import MAX_JSON_DEPTH, json_depth_exceeds

pytestmark = pytest.mark.django_db


def test_depth_counts_objects_and_arrays():
    assert not json_depth_exceeds({"a": [1, {"b": 2}]}, 3)
    assert json_depth_exceeds({"a": [1, {"b": {}}]}, 3)
    assert not json_depth_exceeds(5, 0)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 100_000])
def test_deeply_nested_body_is_a_400_even_anonymously(anon_client, depth):
    body = "[" * depth + "]" * depth
    response = anon_client.post("/api/v1/auth/token", body, content_type="application/json")
    assert response.status_code == 400
    assert "nests deeper" in response.json()["detail"]


def test_nested_body_within_the_limit_reaches_validation(api_client):
    options = {"a": {"b": {"c": {"timeout": 1}}}}
    response = api_client.post(
        "/api/v1/connectors/", json.dumps({"exchange_id": "nope", "options": options}), content_type="application/json"
    )
    assert response.status_code == 400
    assert "exchange_id" in response.json()


def test_nan_is_not_json(api_client):
    response = api_client.post("/api/v1/jobs/bulk", '{"since": NaN}', content_type="application/json")
    assert response.status_code == 400


def test_multipart_is_refused_before_reading(anon_client):
    response = anon_client.post("/api/v1/auth/token", {"username": "a", "password": "b"}, format="multipart")
    assert response.status_code == 415
