"""Settings for Data Collector, read from the environment (and an optional `.env`) with django-environ.

Every default runs out of the box: an SQLite file under `var/`, the embedded candle store, DEBUG off.
"""

import re
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off: export SECRET_KEY=<a long random string> "
            "(or DEBUG=1 for local development). See .env.example."
        )
    SECRET_KEY = "insecure-development-key-only-used-with-DEBUG-on"

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# HTTPS in production (README "Production settings", .env.example); the defaults suit `make run`'s plain
# http on 127.0.0.1.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
# Probes and Prometheus reach a process directly over http; a redirect to https would fail them.
SECURE_REDIRECT_EXEMPT = [r"^health/?$", r"^health/ready/?$", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
# "HTTP_X_FORWARDED_PROTO,https": the proxy in front sets that header and says the request came over https.
_proxy_ssl_header = env.list("SECURE_PROXY_SSL_HEADER", default=[])
if _proxy_ssl_header and len(_proxy_ssl_header) != 2:
    raise ImproperlyConfigured(
        f"SECURE_PROXY_SSL_HEADER must be a header and a value (HTTP_X_FORWARDED_PROTO,https), not {_proxy_ssl_header}"
    )
SECURE_PROXY_SSL_HEADER = tuple(_proxy_ssl_header) or None
# Proxies in front of the web that append to X-Forwarded-For; 0 trusts no such header, so a client
# cannot pick the address its throttles and login lockouts count under.
TRUSTED_PROXIES = env.int("TRUSTED_PROXIES", default=0)

# Request bodies larger than this are refused (413) before they are read.
MAX_REQUEST_BODY_BYTES = env.int("MAX_REQUEST_BODY_BYTES", default=1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BODY_BYTES
# Set: /metrics answers only requests with `Authorization: Bearer <METRICS_TOKEN>`.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# Series (exchange, pair, timeframe) a process labels its per-series metrics with; later ones count as
# pair="other" (apps/monitoring/metrics.py). 0: per exchange only.
METRICS_SERIES_LIMIT = env.int("METRICS_SERIES_LIMIT", default=1000)

INSTALLED_APPS = [
    "django_prometheus",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    "apps.connectors",
    "apps.jobs",
    "apps.ratelimits",
    "apps.marketdata",
    "apps.monitoring",
]

MIDDLEWARE = [
    # First: every log line of a request, this middleware's access line included, carries its id.
    "datacollector.access_log.RequestIdMiddleware",
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "datacollector.middleware.RequestBodyLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files in production (DEBUG off), compressed, with far-future caching of the hashed names.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Last, as axes asks: it turns a locked-out login into datacollector.throttling.lockout_response.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    "datacollector.throttling.LoginAttemptsBackend",  # first: refuses a locked-out login before any check
    "django.contrib.auth.backends.ModelBackend",
]

# Login lockout (django-axes): AXES_FAILURE_LIMIT failed logins from one client address, or for one
# username, lock that address or username out for AXES_COOLOFF_MINUTES. Attempts are counted in the
# database, so every process shares them. Locking by username lets anyone lock a user out for the
# cool-off; the limit is what stops guessing from many addresses.
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("AXES_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = ["ip_address", "username"]
# An attempt during the lockout is refused without restarting the cool-off, so Retry-After holds.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
# A success does not wipe the failures: axes would delete every failure from that address or for that
# username, so a guesser with an account of their own could reset the count between guesses.
AXES_RESET_ON_SUCCESS = False
AXES_LOCKOUT_CALLABLE = "datacollector.throttling.lockout_response"
AXES_CLIENT_IP_CALLABLE = "datacollector.throttling.client_ip"

# DRF's throttles count in this cache. The default is per process: production sets a shared cache
# (redis://127.0.0.1:6379/1) so that every web worker counts the same requests.
CACHES = {"default": env.cache_url_config(env.str("CACHE_URL", default="") or "locmemcache://")}

ROOT_URLCONF = "datacollector.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "datacollector.wsgi.application"
ASGI_APPLICATION = "datacollector.asgi.application"

(BASE_DIR / "var").mkdir(exist_ok=True)
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'var' / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several scheduler workers share the file: wait for the write lock instead of failing at once,
    # and take it at BEGIN so a read-then-write transaction never deadlocks on lock upgrade.
    DATABASES["default"].setdefault("OPTIONS", {}).update({"timeout": 30, "transaction_mode": "IMMEDIATE"})
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A database host that drops packets (rather than refusing them) would hold every reconnect during an
    # outage for the TCP timeout (minutes); the scheduler's outage handling needs a prompt answer.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT", default=5)
    )
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Unset: candles go to a table in the Django database (the embedded store).
MONGODB_URI = env.str("MONGODB_URI", default="")
MONGODB_DATABASE = env.str("MONGODB_DATABASE", default="datacollector")

# Live updates, the WebSocket hub at /ws (apps/monitoring/hub.py). With REDIS_URL the channel layer is Redis
# pub/sub, shared by every process on every machine. Without it (`make run`), each web process has an
# in-memory layer fed from an outbox table the publishers write to (apps/monitoring/live.py): no server needed.
REDIS_URL = env.str("REDIS_URL", default="")
LIVE_OUTBOX = not REDIS_URL
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": "datacollector-live"},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

COLLECTOR_CONFIG = env.path("COLLECTOR_CONFIG", default=BASE_DIR / "config" / "collector.yaml")

# Exports (apps/marketdata/exports.py): files under EXPORT_DIR, deleted EXPORT_TTL_HOURS after they were
# written; an export whose range may hold more than EXPORT_MAX_ROWS candles is refused (400).
EXPORT_DIR = Path(env.str("EXPORT_DIR", default="") or BASE_DIR / "var" / "exports")
EXPORT_TTL_HOURS = env.float("EXPORT_TTL_HOURS", default=24.0)
EXPORT_MAX_ROWS = env.int("EXPORT_MAX_ROWS", default=50_000_000)

# Exchange credentials stay in the environment; a connector names the variables (api_key_env, ...).
# A name must match this regex whole (default: upper-case names ending in _KEY, _SECRET, _PASSWORD or
# _PASSPHRASE, e.g. BINANCE_API_KEY) and must not be reserved below.
CREDENTIAL_ENV_PATTERN = env.str("CREDENTIAL_ENV_PATTERN", default=r"[A-Z][A-Z0-9_]*_(KEY|SECRET|PASSWORD|PASSPHRASE)")
try:
    re.compile(CREDENTIAL_ENV_PATTERN)
except re.error as exc:
    raise ImproperlyConfigured(f"CREDENTIAL_ENV_PATTERN is not a valid regular expression: {exc}") from None
# Variables the project itself reads, and prefixes of variables its platform sets: a connector may never
# name one, or the scheduler would send it to an exchange as a credential. Every env.*("NAME") in this
# file and every variable of .env.example is listed here (tests/connectors/test_secrets.py checks).
RESERVED_ENV_NAMES = frozenset(
    {
        "DEBUG",
        "SECRET_KEY",
        "ALLOWED_HOSTS",
        "CSRF_TRUSTED_ORIGINS",
        "DATABASE_URL",
        "CONN_MAX_AGE",
        "DATABASE_CONNECT_TIMEOUT",
        "MONGODB_URI",
        "MONGODB_DATABASE",
        "COLLECTOR_CONFIG",
        "EXPORT_DIR",
        "EXPORT_TTL_HOURS",
        "EXPORT_MAX_ROWS",
        "CREDENTIAL_ENV_PATTERN",
        "CREDENTIAL_HOSTS_ALLOWED",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "REDIS_URL",
        "CACHE_URL",
        "METRICS_TOKEN",
        "METRICS_SERIES_LIMIT",
        "STATIC_ROOT",
        "WEB_BIND",
        "WEB_CONCURRENCY",
        "MAX_REQUEST_BODY_BYTES",
        "TRUSTED_PROXIES",
        "THROTTLE_ANON",
        "THROTTLE_USER",
        "THROTTLE_TOKEN_IP",
        "THROTTLE_TOKEN_USERNAME",
        "AXES_FAILURE_LIMIT",
        "AXES_COOLOFF_MINUTES",
        "SECURE_SSL_REDIRECT",
        "SECURE_PROXY_SSL_HEADER",
        "SECURE_HSTS_SECONDS",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS",
        "SECURE_HSTS_PRELOAD",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
    }
)
RESERVED_ENV_PREFIXES = ("DJANGO_", "POSTGRES", "PG", "MONGO", "REDIS", "AWS_", "AZURE_", "GOOGLE_", "GCP_")
# Hosts besides each exchange's own (from ccxt) that may receive a connector's credentials, e.g. a
# testnet mirror or an egress proxy; comma separated. Requests with credentials go nowhere else.
CREDENTIAL_HOSTS_ALLOWED = env.list("CREDENTIAL_HOSTS_ALLOWED", default=[])

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default="") or BASE_DIR / "var" / "static")
# WhiteNoise looks there at start-up and warns in every process until collectstatic has filled it.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# collectstatic writes hashed, compressed copies and a manifest; WhiteNoise serves them (see the storage's
# docstring for what happens before collectstatic has run).
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "datacollector.storage.StaticStorage"},
}
STATICFILES_DIRS = [BASE_DIR / "static"]

LOGIN_URL = "admin:login"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["datacollector.permissions.ModelPermissions"],
    "DEFAULT_THROTTLE_CLASSES": ["datacollector.throttling.AnonThrottle", "datacollector.throttling.UserThrottle"],
    # "N/second|minute|hour|day"; the token endpoint has its own two instead of anon and user.
    "DEFAULT_THROTTLE_RATES": {
        "anon": env.str("THROTTLE_ANON", default="60/minute"),
        "user": env.str("THROTTLE_USER", default="1200/minute"),
        "token_ip": env.str("THROTTLE_TOKEN_IP", default="20/minute"),
        "token_username": env.str("THROTTLE_TOKEN_USERNAME", default="10/minute"),
    },
    "NUM_PROXIES": TRUSTED_PROXIES,
    "DEFAULT_PARSER_CLASSES": ["datacollector.parsers.JSONParser", "rest_framework.parsers.FormParser"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "datacollector.schema.AutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Data Collector API",
    "DESCRIPTION": "Connectors, collection jobs, runs, rate limits and stored market data.",
    "VERSION": "1.0.0",
    # The schema and Swagger UI need a login like the rest of the API; Swagger UI is served from
    # drf-spectacular-sidecar's static files, so it works offline and its version is pinned.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Jobs and runs both have a `status`; name each choice set so the schema's enums stay readable.
    "ENUM_NAME_OVERRIDES": {
        "JobStatusEnum": "apps.jobs.models.Job.Status",
        "SettableJobStatusEnum": "apps.jobs.serializers.SETTABLE_STATUSES",
        "RunStatusEnum": "apps.jobs.models.Run.Status",
    },
}

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
LOG_FORMAT = env.str("LOG_FORMAT", default="json")  # json or text
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
if LOG_LEVEL not in _LOG_LEVELS:
    raise ImproperlyConfigured(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, not {LOG_LEVEL!r}")
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or text, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    # Adds `request_id` to every record logged while a web request is handled.
    "filters": {"request_id": {"()": "datacollector.access_log.RequestIdFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["request_id"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    # axes announces itself at INFO in every process; its failed logins and lockouts are warnings.
    "loggers": {"django.db.backends": {"level": "WARNING"}, "axes": {"level": "WARNING"}},
}
