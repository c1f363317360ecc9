"""The ASGI application: Django for HTTP, the live-updates hub (`apps.monitoring.hub`) for WebSockets at /ws.

Served by uvicorn (`make run`; gunicorn with uvicorn workers in production).
"""

import gc
import os

from channels.routing import ProtocolTypeRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacollector.settings")

# Django is set up before the hub's modules import models.
django_application = get_asgi_application()

from apps.monitoring.hub import websocket_application  # noqa: E402

application = ProtocolTypeRouter({"http": django_application, "websocket": websocket_application()})

# What is loaded by now (Django, the apps, ccxt, pandas: some 280,000 objects) lives as long as the process.
# Frozen, it is left out of the collector's full collections, which otherwise scanned it all (130 ms and
# more, during which no live update goes out; bench_hub measured 280 ms pauses under load).
gc.freeze()
