import contextlib
import dataclasses
import difflib
from collections import deque
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models, transaction
from django.utils import timezone

from apps.connectors.exchanges import (
    CCXT_CREDENTIAL_FIELDS,
    CREDENTIAL_ENV_FIELDS,
    credential_env_error,
    get_client,
    is_known_exchange,
    patience,
)
from datacollector.config import get_config

# Where operators find the accepted exchange ids; error messages point there.
EXCHANGES_URL = "/api/v1/exchanges"

# Who may point a connector at custom URLs (staff may too): urls decide where requests, and with
# them the exchange credentials, go.
URLS_PERMISSION = "connectors.set_connector_urls"


def _normalise_key(key: object) -> str:
    return str(key).lower().replace("-", "").replace("_", "")


# Credentials must come from the environment (api_*_env), never sit in `options` where the admin, the
# API and backups show them. A key of `options`, at any depth, is refused when, in lower case without
# "-" and "_", it is one of ccxt's credential fields or contains a word that marks a credential in a
# header or option name (X-MBX-APIKEY, Authorization, OK-ACCESS-PASSPHRASE, ...).
CREDENTIAL_KEYS = frozenset(_normalise_key(field) for field in CCXT_CREDENTIAL_FIELDS)
CREDENTIAL_WORDS = (
    "apikey",
    "secret",
    "passphrase",
    "signature",
    "authorization",
    "token",
    "password",
    "cookie",
    "privatekey",
    "credential",
    "mnemonic",
)


def is_credential_key(key: object) -> bool:
    normalised = _normalise_key(key)
    return normalised in CREDENTIAL_KEYS or any(word in normalised for word in CREDENTIAL_WORDS)


def _has_userinfo_password(value: str) -> bool:
    try:
        return bool(urlsplit(value).password)
    except ValueError:  # not a URL (an unbalanced "[" host, say)
        return False


def credential_paths(options: object) -> list[str]:
    """Paths in `options` that hold credentials (options.headers.X-MBX-APIKEY, options.urls.api[0]...).

    Breadth first and without recursion, so no nesting depth can exhaust the stack; a refused key's
    value is not searched further.
    """
    found = []
    queue: deque[tuple[str, Any]] = deque([("options", options)])
    while queue:
        path, value = queue.popleft()
        if isinstance(value, dict):
            for key, child in value.items():
                child_path = f"{path}.{key}"
                if is_credential_key(key):
                    found.append(child_path)
                else:
                    queue.append((child_path, child))
        elif isinstance(value, list):
            queue.extend((f"{path}[{index}]", child) for index, child in enumerate(value))
        elif isinstance(value, str) and "@" in value and _has_userinfo_password(value):
            found.append(path)  # https://user:password@host
    return found


def nul_path(options: object) -> str | None:
    """The first path in `options` whose key or text holds a NUL character, which PostgreSQL's jsonb refuses."""
    stack: list[tuple[str, Any]] = [("options", options)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                if "\x00" in str(key):
                    return f"{path}.{key!r}"
                stack.append((f"{path}.{key}", child))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", child) for index, child in enumerate(value))
        elif isinstance(value, str) and "\x00" in value:
            return path
    return None


def validate_options(value: object) -> None:
    if not isinstance(value, dict):
        raise ValidationError("options must be a JSON object (the keyword arguments of the ccxt exchange constructor).")
    if (path := nul_path(value)) is not None:
        raise ValidationError(
            f"options must not contain NUL characters (\\u0000), the database cannot store them: {path}."
        )
    paths = credential_paths(value)
    if paths:
        raise ValidationError(
            f"options must not hold credentials: {', '.join(paths)}. Put them in environment variables and "
            "name those in api_key_env, api_secret_env, api_password_env. Refused anywhere in options: ccxt's "
            f"credential fields ({', '.join(sorted(CCXT_CREDENTIAL_FIELDS))}), names containing "
            f"{', '.join(CREDENTIAL_WORDS)} (case, '-' and '_' ignored), and URLs with a password."
        )


def validate_exchange_id(value: str) -> None:
    if not is_known_exchange(value):
        raise ValidationError(
            f"Unknown exchange id {value!r}: use a ccxt exchange id (e.g. binance, kraken, coinbase) or "
            f"'simulated' for the offline exchange; GET {EXCHANGES_URL} lists every accepted id.",
            code="unknown_exchange",
        )


class ConnectorQuerySet(models.QuerySet):
    def for_exchange(self, exchange_id: str) -> "Connector":
        """The connector of `exchange_id`, or a ValidationError telling the operator what to do."""
        validate_exchange_id(exchange_id)
        try:
            return self.get(exchange_id=exchange_id)
        except Connector.DoesNotExist:
            raise ValidationError(
                f"No connector is configured for exchange {exchange_id!r}: create one first "
                "(POST /api/v1/connectors/ or the admin), then add jobs to it.",
                code="no_connector",
            ) from None


class Connector(models.Model):
    """One exchange the collector talks to; `options` go to the ccxt constructor unchanged."""

    exchange_id = models.CharField(
        max_length=64,
        unique=True,
        help_text="A ccxt exchange id (e.g. binance, kraken) or 'simulated' for the offline exchange.",
    )
    name = models.CharField(max_length=100, blank=True)
    enabled = models.BooleanField(default=True)
    options = models.JSONField(
        default=dict,
        blank=True,
        validators=[validate_options],
        help_text="Keyword arguments for the ccxt exchange constructor: urls, sandbox, timeout, options…",
    )
    rate_limit_weight_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Request weight allowed per minute. Blank: the default from collector.yaml."
    )
    rate_limit_burst = models.PositiveIntegerField(
        null=True, blank=True, help_text="Bucket capacity (burst). Blank: the default from collector.yaml."
    )
    retention_days = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Days this exchange's candles are kept (every timeframe). Blank: collector.yaml's retention.",
    )
    api_key_env = models.CharField(
        max_length=100, blank=True, help_text="Name of the environment variable holding the API key (never the key)."
    )
    api_secret_env = models.CharField(
        max_length=100, blank=True, help_text="Name of the environment variable holding the API secret."
    )
    api_password_env = models.CharField(
        max_length=100, blank=True, help_text="Name of the environment variable holding the API passphrase, if any."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ConnectorQuerySet.as_manager()

    class Meta:
        ordering = ["exchange_id"]
        permissions = [("set_connector_urls", "Can point a connector at custom URLs")]

    def __str__(self) -> str:
        return self.name or self.exchange_id

    def save(self, *args, **kwargs) -> None:
        defaults = get_config().rate_limit_for(self.exchange_id)
        if self.rate_limit_weight_per_minute is None:
            self.rate_limit_weight_per_minute = defaults.weight_per_minute
        if self.rate_limit_burst is None:
            self.rate_limit_burst = defaults.burst
        super().save(*args, **kwargs)

    def clean(self) -> None:
        # The rules the API and the admin share: both call full_clean(), so they report the same errors.
        errors: dict[str, str] = {}
        if self.exchange_id:
            try:
                validate_exchange_id(self.exchange_id)
            except ValidationError as exc:
                errors["exchange_id"] = exc.messages[0]
        if self.pk is not None and "exchange_id" not in errors:
            original = Connector.objects.filter(pk=self.pk).values_list("exchange_id", flat=True).first()
            if original is not None and original != self.exchange_id:
                # Stored candles and rate-limit buckets are keyed by the exchange id.
                errors["exchange_id"] = (
                    f"exchange_id cannot be changed (it is {original!r}): candles and rate limits are keyed by it; "
                    "create another connector instead."
                )
        for field in ("rate_limit_weight_per_minute", "rate_limit_burst"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                errors[field] = f"{field} must be a positive integer (leave it empty for the collector.yaml default)."
        for field in CREDENTIAL_ENV_FIELDS:
            value = getattr(self, field)
            error = credential_env_error(field, value) if value else None
            if error is not None:
                errors[field] = error
        if errors:
            raise ValidationError(errors)

    def unique_error_message(self, model_class: type[models.Model], unique_check: tuple[str, ...]) -> ValidationError:
        if model_class is Connector and tuple(unique_check) == ("exchange_id",):
            return ValidationError(
                f"A connector for exchange {self.exchange_id!r} already exists: edit it instead.", code="unique"
            )
        return super().unique_error_message(model_class, unique_check)

    def urls_permission_error(self, user: Any, options: object) -> str | None:
        """Why `user` may not give this (stored or new) connector `options`, for their urls; None if they may.

        Custom urls send the collector's requests anywhere, so setting or changing `options.urls` takes
        staff or the set_connector_urls permission. Keeping the stored urls, or removing them (back to
        the exchange's own), does not.
        """
        urls = options.get("urls") if isinstance(options, dict) else None
        stored = self.options.get("urls") if isinstance(self.options, dict) else None
        if urls is None or urls == stored:
            return None
        if user is not None and (user.is_staff or user.has_perm(URLS_PERMISSION)):
            return None
        return (
            "options.urls: only staff, or users with the permission 'Can point a connector at custom URLs' "
            f"({URLS_PERMISSION}), may set or change a connector's urls. Leave options.urls out (or unchanged) "
            "to use the exchange's own."
        )

    def start(self) -> int:
        """Enable the connector and activate all its jobs; returns how many jobs were touched."""
        Connector.objects.filter(pk=self.pk).update(enabled=True)
        self.enabled = True
        return self.jobs.all().resume()

    def stop(self) -> int:
        """Pause all the connector's jobs (they keep their cursors); returns how many were touched."""
        return self.jobs.all().pause()

    @property
    def refill_per_second(self) -> float:
        return (self.rate_limit_weight_per_minute or 0) / 60.0

    def refresh_markets(self, patience_seconds: float | None = None) -> "RefreshResult":
        """Fetch the exchange's markets (one markets request through the shared rate limit) and store them.

        `patience_seconds` bounds the wait (retries and the rate limit) for callers someone waits on;
        ExchangeError when the exchange did not answer in time or refused.
        """
        client = get_client(self)
        with patience(patience_seconds) if patience_seconds is not None else contextlib.nullcontext():
            markets = client.fetch_markets()
        return Market.objects.refresh(self, markets)


# A refresh someone waits for (the API, an admin action) answers within about this long, plus one request's
# own timeout, or fails.
REFRESH_PATIENCE_SECONDS = 20.0

# How many listed symbols an error about an unknown symbol suggests, and how alike they must be (difflib).
CLOSEST_SYMBOLS = 5
CLOSEST_CUTOFF = 0.5


@dataclasses.dataclass(frozen=True)
class RefreshResult:
    """What a refresh of an exchange's markets changed."""

    exchange_id: str
    total: int  # markets the exchange lists now
    added: int
    updated: int
    delisted: int  # stored markets the exchange no longer lists
    relisted: int  # delisted markets it lists again
    jobs_stopped: int  # active jobs stopped because their market is gone or inactive

    def as_dict(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)


def _market_fields(market: dict) -> dict[str, Any]:
    """The stored fields of one ccxt unified market (`fetch_markets()` item)."""
    return {
        "market_id": str(market.get("id") or "")[:100],
        "base": str(market.get("base") or "")[:32],
        "quote": str(market.get("quote") or "")[:32],
        "settle": str(market.get("settle") or "")[:32],
        "type": str(market.get("type") or "")[:16],
        # ccxt leaves `active` None when the exchange does not say: listed means tradable then.
        "active": market.get("active") is not False,
        "precision": market.get("precision") or {},
        "limits": market.get("limits") or {},
    }


class MarketQuerySet(models.QuerySet):
    def known(self, exchange_id: str) -> bool:
        """Whether the exchange's markets were ever refreshed (then a symbol it does not list is refused)."""
        return self.filter(exchange_id=exchange_id).exists()

    def listing_errors(self, exchange_id: str, symbols: list[str]) -> dict[str, str]:
        """Symbol -> why a job may not collect it, for the symbols the stored markets refuse.

        The one check of a job's symbol against the exchange's listing: Job.clean() (API, admin), the bulk
        API and `backfill` call it. Nothing is refused while the exchange's markets are unknown (never
        refreshed): the exchange itself has the last word at the job's first run.
        """
        if not symbols:
            return {}
        # The common case, every symbol listed and trading, reads only the symbols asked for; the whole
        # listing is read only to suggest the closest symbols for one that is not listed.
        found = {
            symbol: (active, delisted_at)
            for symbol, active, delisted_at in self.filter(exchange_id=exchange_id, symbol__in=symbols).values_list(
                "symbol", "active", "delisted_at"
            )
        }
        if all(found.get(symbol, (False,))[0] for symbol in symbols):
            return {}
        if len(found) < len(set(symbols)) and not self.known(exchange_id):
            return {}
        listed: list[str] | None = None
        errors = {}
        for symbol in symbols:
            active, delisted_at = found.get(symbol, (None, None))
            if active:
                continue
            if active is False:
                why = (
                    f"was delisted on {delisted_at:%Y-%m-%d %H:%M} UTC" if delisted_at else "is not trading (inactive)"
                )
                errors[symbol] = f"Symbol {symbol!r} {why} on {exchange_id}: its candles are no longer published."
                continue
            if listed is None:
                listed = sorted(self.filter(exchange_id=exchange_id, active=True).values_list("symbol", flat=True))
            closest = difflib.get_close_matches(symbol, listed, n=CLOSEST_SYMBOLS, cutoff=CLOSEST_CUTOFF)
            hint = f" Closest listed: {', '.join(closest)}." if closest else ""
            errors[symbol] = (
                f"Symbol {symbol!r} is not listed by {exchange_id} ({len(listed)} active markets stored).{hint} "
                f"GET {EXCHANGES_URL}/{exchange_id}/pairs lists them; refresh the connector's markets if it is new."
            )
        return errors

    def refresh(self, connector: "Connector", markets: list[dict]) -> RefreshResult:
        """Store what the exchange lists now (`markets`: ccxt's unified market dicts) for `connector`.

        New markets are added; changed ones updated; every listed one gets `last_seen`. Stored markets
        the exchange no longer lists are kept, marked inactive with `delisted_at`; a delisted market
        listed again is active again. Active jobs on a market that is gone or inactive stop (status
        error) with a last error saying so, rather than failing at every run. One transaction.
        """
        exchange_id = connector.exchange_id
        now = timezone.now()
        incoming: dict[str, dict[str, Any]] = {}
        for market in markets:
            symbol = market.get("symbol")
            if isinstance(symbol, str) and symbol and len(symbol) <= 64:
                incoming[symbol] = _market_fields(market)
        with transaction.atomic(using=self.db):
            stored = {market.symbol: market for market in self.select_for_update().filter(exchange_id=exchange_id)}
            added, changed, relisted = [], [], 0
            for symbol, fields in incoming.items():
                market = stored.get(symbol)
                if market is None:
                    added.append(
                        Market(exchange_id=exchange_id, symbol=symbol, first_seen=now, last_seen=now, **fields)
                    )
                    continue
                if market.delisted_at is not None:
                    relisted += 1
                    market.delisted_at = None
                    changed.append(market)
                elif any(getattr(market, name) != value for name, value in fields.items()):
                    changed.append(market)
                for name, value in fields.items():
                    setattr(market, name, value)
            self.bulk_create(added, batch_size=1000)
            self.bulk_update(changed, [*_MARKET_UPDATE_FIELDS, "delisted_at"], batch_size=1000)
            self.filter(exchange_id=exchange_id, symbol__in=list(incoming)).update(last_seen=now)
            gone = [
                symbol for symbol, market in stored.items() if symbol not in incoming and market.delisted_at is None
            ]
            self.filter(exchange_id=exchange_id, symbol__in=gone).update(active=False, delisted_at=now)
            stopped = self._stop_jobs(
                connector, gone, [s for s, fields in incoming.items() if not fields["active"]], now
            )
        return RefreshResult(
            exchange_id=exchange_id,
            total=len(incoming),
            added=len(added),
            updated=len(changed) - relisted,
            delisted=len(gone),
            relisted=relisted,
            jobs_stopped=stopped,
        )

    @staticmethod
    def _stop_jobs(connector: "Connector", delisted: list[str], inactive: list[str], now: datetime) -> int:
        # Through the reverse relation: apps.jobs imports this module.
        when = f"markets refreshed {now:%Y-%m-%d %H:%M} UTC"
        stopped = 0
        for symbols, why in (
            (delisted, f"delisted: {connector.exchange_id} no longer lists this market ({when})"),
            (inactive, f"market inactive: {connector.exchange_id} lists this market as not trading ({when})"),
        ):
            if symbols:
                active = connector.jobs.filter(symbol__in=symbols, status=connector.jobs.model.Status.ACTIVE)
                stopped += active.stop(f"{why}; resume the job once it trades again.")
        return stopped


_MARKET_UPDATE_FIELDS = ["market_id", "base", "quote", "settle", "type", "active", "precision", "limits"]


class Market(models.Model):
    """One market (symbol) an exchange lists, as its last markets refresh saw it; delisted ones are kept."""

    exchange_id = models.CharField(max_length=64)
    symbol = models.CharField(max_length=64, help_text="ccxt unified symbol, e.g. BTC/USDT.")
    market_id = models.CharField(max_length=100, blank=True, help_text="The exchange's own id, e.g. BTCUSDT.")
    base = models.CharField(max_length=32)
    quote = models.CharField(max_length=32)
    settle = models.CharField(max_length=32, blank=True, help_text="Settlement currency of derivatives.")
    type = models.CharField(max_length=16, blank=True, help_text="spot, swap, future, option (ccxt's type).")
    active = models.BooleanField(default=True, help_text="Listed and trading at the last refresh.")
    precision = models.JSONField(default=dict, blank=True, help_text="ccxt's precision (price, amount).")
    limits = models.JSONField(default=dict, blank=True, help_text="ccxt's limits (amount, price, cost).")
    first_seen = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)
    delisted_at = models.DateTimeField(null=True, blank=True, help_text="When a refresh no longer found it.")

    objects = MarketQuerySet.as_manager()

    class Meta:
        ordering = ["exchange_id", "symbol"]
        constraints = [models.UniqueConstraint(fields=["exchange_id", "symbol"], name="market_unique_symbol")]
        indexes = [models.Index(fields=["exchange_id", "quote", "base"], name="market_pairs_idx")]

    def __str__(self) -> str:
        return f"{self.exchange_id} {self.symbol}"


def run_markets_task(task: Any) -> dict[str, int | str]:
    """The `markets` background task (apps.jobs.tasks): refresh the markets of connector `params.connector`,
    queued when the connector is created so the web request does not wait for the exchange."""
    connector = Connector.objects.get(pk=task.params["connector"])
    task.report(0.0, f"fetching the markets of {connector.exchange_id}", force=True)
    return connector.refresh_markets().as_dict()
