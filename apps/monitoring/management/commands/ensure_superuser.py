import os

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create the admin user from DJANGO_SUPERUSER_USERNAME, DJANGO_SUPERUSER_PASSWORD and "
        "DJANGO_SUPERUSER_EMAIL unless it exists; without them, print how to create one. Safe to run again."
    )

    def handle(self, *args, **options) -> None:
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME", "").strip()
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD", "")
        email = os.environ.get("DJANGO_SUPERUSER_EMAIL", "").strip()
        user_model = get_user_model()
        if username and user_model.objects.filter(username=username).exists():
            self.stdout.write(f"Admin user {username!r} exists; left unchanged.")
            return
        if not username or not password:
            # Not an error: `make run` goes on and the operator creates the user when they want one.
            self.stdout.write(
                self.style.WARNING(
                    "No admin user created: set DJANGO_SUPERUSER_USERNAME and DJANGO_SUPERUSER_PASSWORD "
                    "(in the environment or .env) and run this again, or run `python manage.py createsuperuser`."
                )
            )
            return
        user_model.objects.create_superuser(username=username, email=email, password=password)
        self.stdout.write(self.style.SUCCESS(f"Created admin user {username!r}."))
