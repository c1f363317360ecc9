from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command


def run(monkeypatch, **env: str) -> str:
    for name in ("DJANGO_SUPERUSER_USERNAME", "DJANGO_SUPERUSER_PASSWORD", "DJANGO_SUPERUSER_EMAIL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = StringIO()
    call_command("ensure_superuser", stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_creates_the_superuser_from_the_environment_once(monkeypatch) -> None:
    env = {
        "DJANGO_SUPERUSER_USERNAME": "boss",
        "DJANGO_SUPERUSER_PASSWORD": "a-long-password-1",
        "DJANGO_SUPERUSER_EMAIL": "boss@example.com",
    }

    first = run(monkeypatch, **env)
    second = run(monkeypatch, **{**env, "DJANGO_SUPERUSER_PASSWORD": "another-password-2"})

    user = get_user_model().objects.get(username="boss")
    assert user.is_superuser
    assert user.is_staff
    assert user.email == "boss@example.com"
    assert user.check_password("a-long-password-1")
    assert "Created" in first
    assert "exists" in second


@pytest.mark.django_db
def test_without_the_variables_it_explains_how_and_succeeds(monkeypatch) -> None:
    out = run(monkeypatch, DJANGO_SUPERUSER_USERNAME="boss")

    assert "DJANGO_SUPERUSER_PASSWORD" in out
    assert "createsuperuser" in out
    assert not get_user_model().objects.exists()
