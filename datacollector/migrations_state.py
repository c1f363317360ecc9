"""A command run before `migrate` meets tables that do not exist: say so in one line, not a traceback."""

# PostgreSQL's undefined_table (psycopg's error, the cause of Django's ProgrammingError); SQLite only
# says "no such table" in its message.
_UNDEFINED_TABLE = "42P01"


def missing_table_message(exc: BaseException | None) -> str | None:
    """The one line to print when `exc`, or an exception in its chain, is a missing table; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        first_line = (str(exc).splitlines() or [""])[0].strip()
        if getattr(exc, "sqlstate", None) == _UNDEFINED_TABLE or first_line.startswith("no such table"):
            return f"The database has no tables yet ({first_line}): run `python manage.py migrate` first."
        exc = exc.__cause__ or exc.__context__
    return None
