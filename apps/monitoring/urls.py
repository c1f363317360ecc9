from django.urls import path, re_path

from apps.monitoring import views

urlpatterns = [
    re_path(r"^health/?$", views.live, name="health"),
    re_path(r"^health/ready/?$", views.ready, name="health-ready"),
    path("metrics", views.metrics, name="prometheus-django-metrics"),
]
