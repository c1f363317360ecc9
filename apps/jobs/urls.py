from rest_framework.routers import SimpleRouter

from apps.jobs import views

# Taken over by the project's API router (datacollector/urls.py), which lists every app's endpoints.
router = SimpleRouter()
router.register("jobs", views.JobViewSet)
router.register("runs", views.RunViewSet)
router.register("tasks", views.TaskViewSet)

urlpatterns: list = []
