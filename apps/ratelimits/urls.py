from rest_framework.routers import SimpleRouter

from apps.ratelimits import views

# Taken over by the project's API router (datacollector/urls.py), which lists every app's endpoints.
router = SimpleRouter()
router.register("ratelimits", views.RateLimitViewSet)

urlpatterns: list = []
