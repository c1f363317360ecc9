"""A throwaway PostgreSQL database for one benchmark, beside DATABASE_URL's (never that one itself)."""

import contextlib
import os
from collections.abc import Iterator
from urllib.parse import urlsplit

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/datacollector"


@contextlib.contextmanager
def scratch_database(label: str, embedded_store: bool = True) -> Iterator[str]:
    """Create and migrate `<DATABASE_URL's name>_bench_<label>`; drop it on exit; yields its name.

    While the block runs, Django's default connection and os.environ["DATABASE_URL"] (which child
    processes inherit) point at it; with `embedded_store`, candles go to its table even if
    MONGODB_URI is set. Everything is restored afterwards, so benchmarks can run one after another
    in one process.
    """
    import django
    import environ
    import psycopg

    base_url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    config = environ.Env.db_url_config(base_url)
    if "postgresql" not in config["ENGINE"]:
        raise SystemExit(f"benchmark {label} needs DATABASE_URL to point at PostgreSQL, not {config['ENGINE']}")
    name = f"{config['NAME']}_bench_{label}"
    admin = {
        "host": config["HOST"] or "127.0.0.1",
        "port": config["PORT"] or 5432,
        "user": config["USER"] or "postgres",
        "password": config["PASSWORD"] or None,
        "dbname": "postgres",
        "autocommit": True,
    }
    with psycopg.connect(**admin) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')

    os.environ["DATABASE_URL"] = urlsplit(base_url)._replace(path=f"/{name}").geturl()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacollector.settings")
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    default = connections["default"]
    default.close()
    original_name, mongodb_uri = default.settings_dict["NAME"], settings.MONGODB_URI
    default.settings_dict["NAME"] = name
    if embedded_store:
        settings.MONGODB_URI = ""
    try:
        call_command("migrate", verbosity=0, interactive=False)
        yield name
    finally:
        connections.close_all()
        default.settings_dict["NAME"] = original_name
        settings.MONGODB_URI = mongodb_uri
        os.environ["DATABASE_URL"] = base_url
        with psycopg.connect(**admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
