"""Who may do what in the API: Django's model permissions, as in the admin.

Reading needs `view_<model>`, creating `add_`, editing `change_`, deleting `delete_`. An action on one
object (connector start/stop, job pause/resume/run-now) changes it, so it needs `change_` whatever its
HTTP method; an action on the collection (jobs/bulk) follows its method (POST: `add_`). Superusers hold
every permission; staff status alone grants nothing here, as in the admin.
"""

from typing import TYPE_CHECKING

from rest_framework.permissions import BasePermission, DjangoModelPermissions
from rest_framework.request import Request

if TYPE_CHECKING:
    # rest_framework.views imports the API settings, which import this module.
    from rest_framework.views import APIView

# What a ViewSet's routed actions already mean; any other action is an extra `@action`.
CRUD_ACTIONS = frozenset({"list", "retrieve", "create", "update", "partial_update", "destroy", "metadata"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ModelPermissions(DjangoModelPermissions):
    """The default permission class of the API (REST_FRAMEWORK["DEFAULT_PERMISSION_CLASSES"])."""

    perms_map = {
        **DjangoModelPermissions.perms_map,
        # DRF lets any authenticated user read; least privilege asks for `view_`.
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
        "OPTIONS": ["%(app_label)s.view_%(model_name)s"],
    }

    def has_permission(self, request: Request, view: "APIView") -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        # The router's API root lists endpoints and has no model.
        if getattr(view, "_ignore_model_permissions", False):
            return True
        model = self._queryset(view).model
        method = request.method
        if is_object_action(view) and method not in SAFE_METHODS:
            method = "PATCH"  # changes the object: `change_`
        return request.user.has_perms(self.get_required_permissions(method, model))


def is_object_action(view: "APIView") -> bool:
    """An extra `@action(detail=True)` of a ViewSet, e.g. /connectors/{id}/start."""
    action = getattr(view, "action", None)
    return action is not None and action not in CRUD_ACTIONS and bool(getattr(view, "detail", False))


def requires(*perms: str) -> type[BasePermission]:
    """A permission class for an API view without a queryset: the user must hold every one of `perms`
    (e.g. `requires("connectors.view_connector")`)."""

    class Requires(BasePermission):
        def has_permission(self, request: Request, view: "APIView") -> bool:
            return bool(request.user and request.user.is_authenticated and request.user.has_perms(perms))

    Requires.__name__ = Requires.__qualname__ = f"Requires({', '.join(perms)})"
    return Requires
