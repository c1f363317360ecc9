FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY requirements.txt .
RUN pip install -r requirements.txt gunicorn==23.0.0

COPY . .
RUN DEBUG=1 python manage.py collectstatic --noinput --verbosity 0

RUN useradd --system --home /app collector && chown -R collector /app
USER collector

EXPOSE 8000
CMD ["gunicorn", "datacollector.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3"]
