#!/usr/bin/env python
import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacollector.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    from datacollector.migrations_state import missing_table_message

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        # Configuration mistakes (SECRET_KEY, collector.yaml) are the operator's to fix: the message names
        # the setting or key; a traceback would only bury it.
        sys.stderr.write(f"Configuration error: {exc}\n")
        sys.exit(2)
    except Exception as exc:
        message = missing_table_message(exc)
        if message is None:
            raise
        sys.stderr.write(f"{message}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
