from django.db import connection


def test_database_is_postgresql_in_the_test_suite(db) -> None:
    assert connection.vendor == "postgresql"
