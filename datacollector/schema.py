"""The OpenAPI schema of the API: drf-spectacular's, with the error answers of every operation.

drf-spectacular documents only the success of an operation. A client (and schemathesis, which checks
that every answer is documented) also needs the refusals: 400 with the field errors, 401/403 when the
caller is not let in, 404 for an unknown object or page, 411/413/415 for a body sent chunked, too
large or in another format, 429 when throttled. Each is added where it can happen, judged from what
the view declares (parameters, body, permissions, throttles), and never over a response the view
documents itself. 411 and 413 come from RequestBodyLimitMiddleware (datacollector/middleware.py),
before any view.
"""

from typing import Any

from drf_spectacular import openapi
from drf_spectacular.plumbing import ResolvedComponent
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import AllowAny


class ErrorSerializer(serializers.Serializer):
    """Why the request was refused (or could not be served)."""

    detail = serializers.CharField()


# DRF reports a refused body or query as {field: [messages]}; a nested field maps its own fields (or
# list positions) the same way, and a body that cannot be parsed at all is {"detail": message}.
VALIDATION_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": (
        "Each key names a refused field (non_field_errors: the whole input; detail: the body could not be "
        "parsed); each value lists what is wrong and what is accepted."
    ),
    "additionalProperties": {
        "anyOf": [
            {"type": "array", "items": {"type": "string"}},
            {"type": "string"},
            {"type": "object"},
        ]
    },
}

_DESCRIPTIONS = {
    400: "Invalid input: the body names each refused field and what it accepts.",
    401: "Not authenticated, or the credentials are wrong.",
    403: "Not authenticated, or not allowed to do this.",
    404: "No such object (or page).",
    411: "A chunked body (Transfer-Encoding without Content-Length): send Content-Length.",
    413: "The body is larger than the limit (MAX_REQUEST_BODY_BYTES).",
    415: "The body's Content-Type is not one of those listed for the request.",
    429: "Too many requests: wait the seconds in the Retry-After header.",
}


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's AutoSchema that also documents each operation's error responses."""

    def get_operation(
        self, path: str, path_regex: str, path_prefix: str, method: str, registry: Any
    ) -> dict[str, Any] | None:
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        for status in self._error_statuses(operation):
            operation["responses"].setdefault(str(status), self._error_response(status))
        return operation

    def _error_statuses(self, operation: dict[str, Any]) -> list[int]:
        locations = {parameter["in"] for parameter in operation.get("parameters", [])}
        has_body = "requestBody" in operation
        statuses = []
        if has_body or "query" in locations:
            statuses.append(400)
        if self._requires_authentication():
            statuses.append(401 if self._authenticate_header() else 403)
        if self._checks_permissions() or (has_body and self._uses_session_authentication()):
            # Session-authenticated writes also need a CSRF token; without it DRF answers 403.
            statuses.append(403)
        if "path" in locations or (self.method == "GET" and self._is_list_view() and self._get_paginator()):
            statuses.append(404)
        if has_body:
            statuses += [411, 413, 415]
        if self.view.get_throttles():
            statuses.append(429)
        return sorted(set(statuses))

    def _permission_classes(self) -> list[type]:
        return [type(permission) for permission in self.view.get_permissions()]

    def _requires_authentication(self) -> bool:
        return bool(self.view.get_authenticators()) and self._checks_permissions()

    def _checks_permissions(self) -> bool:
        return any(permission is not AllowAny for permission in self._permission_classes())

    def _authenticate_header(self) -> str | None:
        # DRF answers 401 only when the first authenticator names a WWW-Authenticate scheme, else 403.
        authenticators = self.view.get_authenticators()
        return authenticators[0].authenticate_header(None) if authenticators else None

    def _uses_session_authentication(self) -> bool:
        return any(isinstance(auth, SessionAuthentication) for auth in self.view.get_authenticators())

    def _error_response(self, status: int) -> dict[str, Any]:
        if status == 400:
            component = ResolvedComponent(
                name="ValidationError",
                type=ResolvedComponent.SCHEMA,
                schema=VALIDATION_ERROR_SCHEMA,
                object="ValidationError",
            )
            self.registry.register_on_missing(component)
        else:
            component = self.resolve_serializer(ErrorSerializer, "response")
        content = {
            # A text renderer (CSV) writes the same errors as text.
            media_type: {"schema": component.ref if "json" in media_type else {"type": "string"}}
            for media_type in self.map_renderers("media_type")
        }
        response: dict[str, Any] = {"description": _DESCRIPTIONS[status], "content": content}
        if status == 429:
            response["headers"] = {
                "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}
            }
        return response
