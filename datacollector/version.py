"""The product's version: pyproject.toml's, the one place it is written (the image copies the file)."""

import functools
import tomllib

from django.conf import settings


@functools.cache
def version() -> str:
    try:
        with open(settings.BASE_DIR / "pyproject.toml", "rb") as file:
            return str(tomllib.load(file)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"
