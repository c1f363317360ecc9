FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# gunicorn, uvicorn-worker and whitenoise are pinned in requirements.txt like everything else.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
# Hashed, compressed static files (WhiteNoise serves them with DEBUG off); SECRET_KEY only for this step.
RUN SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput --verbosity 0

RUN useradd --system --uid 10001 --home /app collector && chown -R collector /app
USER 10001

EXPOSE 8000
# The ASGI app (HTTP and the /ws hub) on gunicorn-managed uvicorn workers. WEB_BIND and WEB_CONCURRENCY
# set the address and the worker processes; tests/test_production_server.py runs this very line.
CMD ["sh", "-c", "exec gunicorn datacollector.asgi:application -k datacollector.workers.UvicornWorker --bind \"${WEB_BIND:-0.0.0.0:8000}\" --workers \"${WEB_CONCURRENCY:-3}\" --graceful-timeout 30"]
