"""A URL whose view fails, to see what the web logs for an unhandled exception."""

from django.http import HttpRequest, HttpResponse
from django.urls import path


def fail(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("boom in a view")


urlpatterns = [path("fail", fail)]
