"""The API's request body parsers: JSON with a nesting limit, and HTML forms (the token endpoint).

No multipart parser: no endpoint takes a file, so a multipart body is a 415 before anything is read.
"""

import json
from typing import Any

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError

# Deeper than any document the API accepts (connector options nest a few levels), far below the depth
# where Python's JSON decoder, deepcopy or a recursive validator would raise RecursionError.
MAX_JSON_DEPTH = 32


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests dicts and lists more than `limit` levels deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, refusing bodies nested deeper than MAX_JSON_DEPTH with a 400."""

    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        message = f"JSON parse error - the body nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays."
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = stream.read().decode(encoding) if stream is not None else ""
        except UnicodeDecodeError as exc:
            raise ParseError(f"JSON parse error - the body is not valid {encoding}: {exc}") from None
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except RecursionError:
            raise ParseError(message) from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        if json_depth_exceeds(data, MAX_JSON_DEPTH):
            raise ParseError(message)
        return data


def _refuse_constant(name: str) -> None:
    # NaN and Infinity are not JSON; DRF's own parser refuses them the same way (strict mode).
    raise ValueError(f"{name} is not a valid JSON value")
