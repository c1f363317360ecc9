"""Exchange clients: the `ExchangeClient` protocol, the ccxt client, the offline `simulated` exchange,
and the classification of exchange errors into transient (retry) and permanent (stop the job).

Every request a client makes goes through `_Guard.call()`: check the exchange's shared circuit breaker,
take the request's weight from the shared rate limit (`RateLimit.objects.acquire`), send, feed what the
exchange says about its own limit back to the shared bucket, classify errors, and retry transient ones
with exponential backoff and jitter. The bucket and the breaker live in the database, so every worker on
every machine backs off together; nothing here is process state another worker needs.
"""

import collections
import contextlib
import copy
import dataclasses
import email.utils
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import ccxt
import tenacity
from django.conf import settings
from django.utils import timezone

from apps.marketdata.timeframes import timeframe_ms
from apps.monitoring.metrics import FETCH_SECONDS, RATE_LIMITED
from apps.ratelimits.models import RateLimit, RateLimitTimeout
from datacollector.config import CollectionConfig, RetryConfig, get_config

SIMULATED = "simulated"

SIMULATED_TIMEFRAMES = ("1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w")

# The connector fields naming credential variables, and the ccxt option each one fills.
CREDENTIAL_ENV_FIELDS = {"api_key_env": "apiKey", "api_secret_env": "secret", "api_password_env": "password"}

# Every credential field ccxt knows (apiKey, secret, uid, login, password, twofa, privateKey, ...): the
# base class lists them all and each exchange marks the ones it needs (a test checks the union).
CCXT_CREDENTIAL_FIELDS = frozenset(ccxt.Exchange().describe()["requiredCredentials"])

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ExchangeError(Exception):
    """Base of the errors collection raises; the message is what the operator sees."""


class TransientExchangeError(ExchangeError):
    """Worth retrying later: network, timeout, exchange unavailable, rate limited."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentExchangeError(ExchangeError):
    """Retrying cannot help (bad symbol, authentication, not supported): the job stops until resumed."""


class ExchangeClient(Protocol):
    exchange_id: str
    stats: "RequestStats"

    def fetch_ohlcv(self, symbol: str, timeframe: str, since_ms: int, limit: int) -> list[list[float]]: ...

    def request_weight(self, timeframe: str, limit: int) -> int: ...

    def page_limit(self) -> int: ...

    def markets(self) -> list[str]: ...

    def fetch_markets(self) -> list[dict]: ...

    def timeframes(self) -> list[str]: ...

    def server_time_ms(self) -> int: ...


def known_exchange_ids() -> list[str]:
    return [SIMULATED, *ccxt.exchanges]


def is_known_exchange(exchange_id: str) -> bool:
    return exchange_id == SIMULATED or exchange_id in ccxt.exchanges


@functools.cache
def offline_timeframes(exchange_id: str) -> tuple[str, ...]:
    """The timeframes an exchange offers, as ccxt knows them without the network.

    Empty when the exchange declares none offline; callers then accept any well-formed timeframe and
    leave the final word to the exchange at collection time.
    """
    if exchange_id == SIMULATED:
        return SIMULATED_TIMEFRAMES
    exchange_class = getattr(ccxt, exchange_id)
    return tuple((exchange_class().timeframes or {}).keys())


@functools.cache
def exchange_description(exchange_id: str) -> dict[str, Any]:
    """What ccxt says about an exchange without the network: its name, whether it can fetch OHLCV
    (True, False or "emulated"), and the delay between requests ccxt's own throttle would keep (ms)."""
    if exchange_id == SIMULATED:
        return {"name": "Simulated (offline)", "fetch_ohlcv": True, "ccxt_rate_limit_ms": None}
    exchange = getattr(ccxt, exchange_id)()
    return {
        "name": exchange.name,
        "fetch_ohlcv": exchange.has.get("fetchOHLCV") or False,
        "ccxt_rate_limit_ms": exchange.rateLimit,
    }


# --- Retry policy, circuit breaker, error classification -------------------------------------------


@dataclasses.dataclass
class RetryPolicy:
    """How one request is retried inside a client, and the shared circuit breaker's thresholds.

    Read from collector.yaml (`retry`, and `collection.no_progress_timeout_seconds`) unless a test or a
    benchmark sets `RETRY_POLICY`.
    """

    # The defaults are collector.yaml's (RetryConfig documents each); a policy set by a test overrides some.
    initial_seconds: float = RetryConfig.initial_seconds
    max_seconds: float = RetryConfig.max_seconds
    acquire_timeout_seconds: float = RetryConfig.acquire_timeout_seconds
    circuit_threshold: int = RetryConfig.circuit_threshold
    circuit_cooldown_seconds: float = RetryConfig.circuit_cooldown_seconds
    circuit_successes_to_close: int = RetryConfig.circuit_successes_to_close
    # A request is retried until this long has passed without an answer (so a job fails only when no page
    # arrived for this long).
    no_progress_seconds: float = CollectionConfig.no_progress_timeout_seconds
    # A cap on the attempts of one request; None: only `no_progress_seconds` ends the retries.
    attempts: int | None = None

    @classmethod
    def from_config(cls) -> "RetryPolicy":
        config = get_config()
        retry = config.retry
        return cls(
            initial_seconds=retry.initial_seconds,
            max_seconds=retry.max_seconds,
            acquire_timeout_seconds=retry.acquire_timeout_seconds,
            circuit_threshold=retry.circuit_threshold,
            circuit_cooldown_seconds=retry.circuit_cooldown_seconds,
            circuit_successes_to_close=retry.circuit_successes_to_close,
            no_progress_seconds=config.collection.no_progress_timeout_seconds,
        )


# Tests and benchmarks may set a policy here; None: collector.yaml's.
RETRY_POLICY: RetryPolicy | None = None

# A thread's own bound on its requests' patience (`patience()`), over the policy above.
_patience = threading.local()


def retry_policy() -> RetryPolicy:
    return getattr(_patience, "policy", None) or RETRY_POLICY or RetryPolicy.from_config()


@contextlib.contextmanager
def patience(seconds: float) -> Iterator[None]:
    """Within the block, this thread's requests give up after `seconds` without an answer, and wait no
    longer than that for the shared rate limit: for a request someone waits on (a web request)."""
    base = retry_policy()
    _patience.policy = dataclasses.replace(
        base,
        no_progress_seconds=min(base.no_progress_seconds, seconds),
        acquire_timeout_seconds=min(base.acquire_timeout_seconds, seconds),
    )
    try:
        yield
    finally:
        del _patience.policy


@dataclasses.dataclass
class RequestStats:
    """What one client did; collection reads the difference over a run."""

    requests: int = 0
    failures: int = 0
    rate_limited: int = 0  # 429/418 answers: zero when the shared limiter does its job
    rate_limit_wait: float = 0.0  # seconds spent waiting for the shared bucket

    def snapshot(self) -> "RequestStats":
        return dataclasses.replace(self)


class _Retryable(TransientExchangeError):
    """A transient error the client retries itself, with backoff, until no answer came for too long."""


# Permanent: nothing a retry can change. Checked before the transient branch because ccxt's tree is
# not clean (an error class can move between versions); anything unlisted is treated as transient.
_PERMANENT = (
    ccxt.AuthenticationError,
    ccxt.BadRequest,  # includes BadSymbol
    ccxt.ArgumentsRequired,
    ccxt.NotSupported,
    ccxt.InvalidOrder,
    ccxt.InsufficientFunds,
    ccxt.InvalidAddress,
    ccxt.OperationRejected,
    ccxt.InvalidProxySettings,
    ccxt.ExchangeClosedByUser,
)

# Binance's codes for trouble on its side (ccxt 4.5.90 maps -1000 and -1001 to OperationFailed, -1003 to
# RateLimitExceeded, -1007 to RequestTimeout and leaves -1008 unmapped, a plain ExchangeError): -1000
# unknown error, -1001 internal error / disconnected, -1003 too many requests, -1007 backend timeout,
# -1008 server overloaded. Whatever class ccxt picks, they are worth retrying.
TRANSIENT_EXCHANGE_CODES = frozenset({-1000, -1001, -1003, -1007, -1008})

_HINTS: list[tuple[type[Exception], str]] = [
    (ccxt.BadSymbol, "the exchange does not list this symbol; check the job's symbol against its markets"),
    (ccxt.AuthenticationError, "the exchange rejected the credentials; check the API key environment variables"),
    (ccxt.NotSupported, "the exchange does not support this request through ccxt"),
    (ccxt.BadRequest, "the exchange rejected the request as invalid; check the job's symbol and timeframe"),
    (ccxt.OperationRejected, "the exchange refused the request"),
    (ccxt.DDoSProtection, "rate limited by the exchange"),
    (ccxt.RequestTimeout, "the request timed out"),
    (ccxt.ExchangeNotAvailable, "the exchange is unavailable"),
    (ccxt.NetworkError, "network error"),
]


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the exchange answered to the failed request, when it answered at all."""

    status: int | None = None  # HTTP status
    code: int | None = None  # the exchange's own error code (Binance: {"code": -1008, "msg": ...})
    message: str = ""

    @classmethod
    def from_body(cls, status: int | None, body: object) -> "Answer":
        code, message = None, ""
        if isinstance(body, str) and body.startswith("{") and len(body) < 4096:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                raw_code, message = parsed.get("code"), str(parsed.get("msg") or "")
                code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
        return cls(status, code, message)


def _describe(exchange_id: str, exc: BaseException) -> str:
    hint = next((text for cls, text in _HINTS if isinstance(exc, cls)), "exchange error")
    detail = str(exc).strip()
    if len(detail) > 300:
        detail = detail[:300] + "…"
    return f"{exchange_id}: {hint} ({type(exc).__name__}: {detail})"


def classify(
    exchange_id: str, exc: BaseException, retry_after: float | None = None, answer: Answer | None = None
) -> ExchangeError:
    """Map a ccxt (or parsing) exception to our two kinds, with a message the operator can act on.

    The HTTP status and the exchange's code (`answer`) win over ccxt's class: an HTTP 5xx is the
    exchange's trouble whatever its body says, and so are the codes in TRANSIENT_EXCHANGE_CODES.
    """
    if isinstance(exc, ExchangeError):
        return exc
    message = _describe(exchange_id, exc)
    answer = answer or Answer()
    if (answer.status is not None and answer.status >= 500) or answer.code in TRANSIENT_EXCHANGE_CODES:
        return _Retryable(message, retry_after)
    if isinstance(exc, _PERMANENT):
        return PermanentExchangeError(message)
    if isinstance(exc, ccxt.NetworkError | ccxt.BadResponse | ccxt.NullResponse):
        return _Retryable(message, retry_after)
    # Unknown exchange errors (ccxt.ExchangeError with an unmapped code): not worth hammering at once,
    # but the scheduler retries the job later with backoff.
    return TransientExchangeError(message, retry_after)


def fault_label(exc: BaseException, answer: Answer | None = None) -> str:
    """A short name for what went wrong, for counting in the message of a job that made no progress."""
    answer = answer or Answer()
    if answer.status is not None and answer.status >= 400:
        parts = [f"HTTP {answer.status}"]
        if answer.code is not None:
            parts.append(str(answer.code))
        if answer.message:
            parts.append(answer.message.split(".")[0][:80])
        return " ".join(parts)
    if isinstance(exc, _CircuitOpen):
        return "circuit open"
    if isinstance(exc, ccxt.RequestTimeout):
        return "timeout"
    if isinstance(exc, ccxt.BadResponse | ccxt.NullResponse):
        return "truncated body"
    if isinstance(exc, ccxt.NetworkError):
        return "connection reset"
    return type(exc).__name__


def _retry_after_seconds(headers: Any) -> float | None:
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


class _CircuitOpen(_Retryable):
    """The exchange's shared circuit is open (or half-open with another worker's trial in flight)."""


class NoProgress(TransientExchangeError):
    """No answer for `no_progress_seconds`: the message counts what kept failing."""


# While half-open and another worker holds the trial, ask again this often.
_TRIAL_POLL_SECONDS = 1.0

# When this process last found each exchange's circuit closed with no failures (the guard's clock); see
# `_Guard._check_circuit`. A failure of ours forgets it at once.
CIRCUIT_REMEMBER_SECONDS = 1.0
_circuit_closed_at: dict[str, float] = {}
_circuit_lock = threading.Lock()


def _forget_circuit(exchange_id: str) -> None:
    with _circuit_lock:
        _circuit_closed_at.pop(exchange_id, None)


class _Guard:
    """The shared limiter, the circuit breaker and the retries around every request of one exchange."""

    # Replaced in tests so the retry loop runs without real sleeps.
    clock: Callable[[], float] = staticmethod(time.monotonic)
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    def __init__(
        self,
        exchange_id: str,
        weight_limit_per_minute: int | None,
        bucket_capacity: float | None,
        refill_per_second: float | None = None,
        window_seconds: float | None = None,
    ) -> None:
        self.exchange_id = exchange_id
        self.weight_limit_per_minute = weight_limit_per_minute
        self.bucket_capacity = bucket_capacity
        self.refill_per_second = refill_per_second
        # The fixed window the exchange counts in once it has announced its limits (the row then counts in
        # it too, and window_seconds says so); until then the row is a token bucket.
        self.announced_window_seconds = window_seconds
        self.window_seconds: float | None = None
        self.stats = RequestStats()

    @property
    def _limit(self) -> tuple[float, float] | None:
        if self.bucket_capacity is None or self.refill_per_second is None:
            return None
        return float(self.bucket_capacity), self.refill_per_second

    def call(
        self,
        weight: int,
        send: Callable[[], T],
        headers: Callable[[], Any] = lambda: None,
        answer: Callable[[], Answer | None] = lambda: None,
    ) -> T:
        """Send with retries: transient errors are retried with capped, jittered backoff until
        `no_progress_seconds` pass without an answer; then `NoProgress` names what kept failing."""
        policy = retry_policy()
        started = self.clock()
        deadline = started + policy.no_progress_seconds
        faults: collections.Counter[str] = collections.Counter()

        def stop(state: tenacity.RetryCallState) -> bool:
            if policy.attempts is not None and state.attempt_number >= policy.attempts:
                return True
            exc = state.outcome.exception() if state.outcome else None
            retry_after = getattr(exc, "retry_after", None) or 0.0
            # A wait the deadline cannot hold (a long ban) is the scheduler's business, not a sleep here.
            return self.clock() + retry_after >= deadline

        def wait(state: tenacity.RetryCallState) -> float:
            # Full jitter: a random wait up to the exponential ceiling, so workers that failed together
            # do not come back together; never shorter than what the exchange asked (Retry-After).
            backoff = tenacity.wait_random_exponential(multiplier=policy.initial_seconds, max=policy.max_seconds)(state)
            exc = state.outcome.exception() if state.outcome else None
            retry_after = getattr(exc, "retry_after", None) or 0.0
            return max(0.0, min(max(backoff, retry_after), deadline - self.clock()))

        retrying = tenacity.Retrying(
            stop=stop,
            wait=wait,
            sleep=self.sleep,
            retry=tenacity.retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            return retrying(self._attempt, weight, send, headers, answer, policy, faults)
        except _Retryable as exc:
            # The retries are spent: the scheduler takes over, told what kept failing.
            if policy.attempts is not None and retrying.statistics.get("attempt_number", 0) >= policy.attempts:
                raise TransientExchangeError(str(exc), exc.retry_after) from exc
            counted = ", ".join(f"{count} x {label}" for label, count in faults.most_common())
            seconds = self.clock() - started
            raise NoProgress(
                f"{self.exchange_id}: no answer for {seconds:.0f} s: {counted} (last: {exc})", exc.retry_after
            ) from exc

    def _attempt(
        self,
        weight: int,
        send: Callable[[], T],
        headers: Callable[[], Any],
        answer: Callable[[], Answer | None],
        policy: RetryPolicy,
        faults: "collections.Counter[str]",
    ) -> T:
        try:
            return self._attempt_once(weight, send, headers, answer, policy)
        except _Retryable as exc:
            faults[getattr(exc, "label", None) or fault_label(exc)] += 1
            raise

    def _attempt_once(
        self,
        weight: int,
        send: Callable[[], T],
        headers: Callable[[], Any],
        answer: Callable[[], Answer | None],
        policy: RetryPolicy,
    ) -> T:
        # Whether the breaker has anything to reset after a success, read by the same query that checks it:
        # most requests then need no write at all.
        failures_recorded, trial = self._check_circuit(policy)
        try:
            waited = RateLimit.objects.acquire(self.exchange_id, weight, policy.acquire_timeout_seconds, self._limit)
        except RateLimitTimeout as exc:
            # Not an exchange failure: the shared budget is spent (or the exchange banned us for a while).
            error = _Retryable(str(exc), exc.wait)
            error.label = "no rate-limit tokens"  # type: ignore[attr-defined]
            raise error from exc
        self.stats.rate_limit_wait += waited
        if waited > 0 and not trial:
            # The circuit may have opened (and gone half-open) while we waited, unseen by a remembered
            # state: look again before sending, so that a half-open circuit still gets exactly one trial.
            failures_recorded, trial = self._check_circuit(policy, remembered=False)
        self.stats.requests += 1
        try:
            with FETCH_SECONDS.labels(self.exchange_id).time():
                result = send()
        except Exception as exc:
            response_headers = headers()
            self._observe(response_headers)
            retry_after = _retry_after_seconds(response_headers)
            if isinstance(exc, ccxt.DDoSProtection):
                self.stats.rate_limited += 1
                RATE_LIMITED.labels(self.exchange_id).inc()
                # The exchange asked every caller to back off: pause the shared bucket, not just us.
                RateLimit.objects.block(self.exchange_id, retry_after if retry_after is not None else 60.0)
            what = answer()
            error = classify(self.exchange_id, exc, retry_after, what)
            if isinstance(error, PermanentExchangeError):
                raise error from exc
            error.label = fault_label(exc, what)  # type: ignore[attr-defined]
            self.stats.failures += 1
            _forget_circuit(self.exchange_id)
            opened = RateLimit.objects.record_failure(
                self.exchange_id, policy.circuit_threshold, policy.circuit_cooldown_seconds
            )
            if opened:
                logger.warning("circuit opened for %s after repeated failures: %s", self.exchange_id, error)
            raise error from exc
        self._observe(headers())
        if trial or failures_recorded:
            # A failure another worker records between our check and here is reset by the next success
            # that sees it: the count is of consecutive failures, and this success was one.
            RateLimit.objects.record_success(self.exchange_id, trial, policy.circuit_successes_to_close)
            if trial:
                logger.info("%s: trial request succeeded while the circuit is half-open", self.exchange_id)
        return result

    def _check_circuit(self, policy: RetryPolicy, remembered: bool = True) -> tuple[bool, bool]:
        """Raise while the exchange's circuit is open; else (failures recorded against it, this is the
        half-open circuit's one trial request).

        A closed circuit with no failures recorded is remembered by the process for
        CIRCUIT_REMEMBER_SECONDS: at a minute's close every worker thread asks at once, and the healthy
        answer rarely changes. Trusting it a moment too long is safe: the bucket grants no tokens while
        the circuit is open, and a request that had to wait for them looks again (`remembered=False`).
        """
        now = timezone.now()
        if remembered and self._circuit_closed_lately():
            return False, False
        state = (
            RateLimit.objects.filter(exchange_id=self.exchange_id)
            .values_list("circuit_failures", "circuit_open_until")
            .first()
        )
        if state is None:  # no bucket yet: acquire creates it, with nothing recorded
            return False, False
        failures, open_until = state
        if open_until is None and not failures:
            with _circuit_lock:
                _circuit_closed_at[self.exchange_id] = self.clock()
        if open_until is None:
            return bool(failures), False
        if open_until > now:
            seconds = (open_until - now).total_seconds()
            raise _CircuitOpen(
                f"{self.exchange_id}: circuit open after repeated failures; no requests for {seconds:.0f}s more",
                seconds,
            )
        # Half-open: one trial at a time across every worker; the others wait for its outcome.
        if RateLimit.objects.claim_trial(self.exchange_id, policy.circuit_cooldown_seconds):
            return bool(failures), True
        raise _CircuitOpen(
            f"{self.exchange_id}: circuit half-open, another worker's trial request is in flight",
            _TRIAL_POLL_SECONDS,
        )

    def _circuit_closed_lately(self) -> bool:
        with _circuit_lock:
            seen = _circuit_closed_at.get(self.exchange_id)
        return seen is not None and 0 <= self.clock() - seen < CIRCUIT_REMEMBER_SECONDS

    def learn_announced(self, weight_per_minute: int) -> None:
        """The exchange announced its request weight per minute: cap the shared bucket and measure the
        used-weight header against it from now on."""
        row, changed = RateLimit.objects.learn_announced_limit(
            self.exchange_id, weight_per_minute, self._limit, self.announced_window_seconds
        )
        if changed and row.capped:
            # Logged by the one process whose markets load changed what the database knew: once per change.
            logger.warning(
                "%s announces %d request weight per minute; the configured %.0f/min (burst %.0f) is capped "
                "to %.0f/min (burst %.0f)",
                self.exchange_id,
                weight_per_minute,
                row.configured_weight_per_minute,
                row.configured_capacity,
                row.refill_per_second * 60,
                row.capacity,
            )
        if self.weight_limit_per_minute is None or weight_per_minute < self.weight_limit_per_minute:
            self.weight_limit_per_minute = weight_per_minute
        self.bucket_capacity, self.refill_per_second = row.capacity, row.refill_per_second
        self.window_seconds = row.window_seconds

    def _observe(self, headers: Any) -> None:
        if not headers or not self.weight_limit_per_minute:
            return
        used = headers.get("X-MBX-USED-WEIGHT-1M") or headers.get("x-mbx-used-weight-1m")
        if used is None:
            return
        try:
            used = int(used)
        except ValueError:
            logger.warning("%s sent an unreadable used-weight header: %r", self.exchange_id, used)
            return
        if self.bucket_capacity is not None and self.refill_per_second is not None:
            # What the bucket can still grant in this minute: its capacity at most, plus the refill until
            # the minute rolls over (a window: all of it, whenever). Less headroom than that changes
            # nothing: skip the query (most answers, when only the collector uses the exchange and the
            # minute is young).
            seconds_left = self.window_seconds or 60.0 - time.time() % 60.0
            if self.weight_limit_per_minute - used >= self.bucket_capacity + self.refill_per_second * seconds_left:
                return
        RateLimit.objects.observe_used_weight(self.exchange_id, used, self.weight_limit_per_minute)


# --- ccxt ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExchangeProfile:
    """What ccxt does not say precisely enough: the weight our requests cost and how large a page is."""

    klines_weight: int = 1
    page_limit: int | None = None  # None: ccxt's features, else 500
    markets_weight: int = 1
    time_weight: int = 1
    # The exchange's own weight limit per minute, which its used-weight header counts against.
    weight_limit_per_minute: int | None = None
    # Options merged UNDER the connector's (the connector wins), keeping ccxt to what collection needs.
    default_config: dict = dataclasses.field(default_factory=dict)
    # ccxt's implicit method of the exchange's own klines endpoint, whose rows are Binance-style arrays
    # [open time, "open", "high", "low", "close", "volume", ...]: fetched raw, they skip ccxt's generic
    # parse_ohlcv (about 5 us a candle) and keep its transport, signing and error mapping. None: fetch_ohlcv.
    raw_klines: str | None = None
    # The exchange announces its limits in exchangeInfo.rateLimits (Binance): the bucket is capped to them.
    announces_limits: bool = False
    # The exchange counts weight per fixed window this long (Binance: per clock minute), so the shared
    # limit may spend a window's budget at once, as the exchange allows. None: a bucket refilling evenly.
    weight_window_seconds: float | None = None


PROFILES: dict[str, ExchangeProfile] = {
    # Binance spot: GET /api/v3/klines weighs 2 whatever the limit and returns at most 1,000 rows;
    # exchangeInfo weighs 20, time 1. Markets are loaded for spot only (linear/inverse markets would
    # call fapi/dapi exchangeInfo, and margin pairs sapi) unless the connector's options say otherwise;
    # currencies not at all: with credentials ccxt would load them with a signed sapi request that
    # collection never uses (and that goes to api.binance.com whatever the connector's urls say).
    "binance": ExchangeProfile(
        klines_weight=2,
        page_limit=1000,
        markets_weight=20,
        time_weight=1,
        weight_limit_per_minute=6000,
        default_config={
            "options": {"fetchMarkets": {"types": ["spot"]}, "fetchMargins": False, "fetchCurrencies": False}
        },
        raw_klines="publicGetKlines",
        announces_limits=True,
        weight_window_seconds=60.0,
    ),
}

_INTERVAL_SECONDS = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400}


def announced_weight_per_minute(body: str) -> int | None:
    """The strictest REQUEST_WEIGHT limit of a Binance exchangeInfo body, per minute; None if it has none.

    Only the `rateLimits` array is decoded (the body lists every market and weighs megabytes).
    """
    at = body.find('"rateLimits":')
    if at < 0:
        return None
    # raw_decode does not skip whitespace itself: `"rateLimits": [` (a body that is not compact) would fail.
    start = json.decoder.WHITESPACE.match(body, at + len('"rateLimits":')).end()
    try:
        limits, _ = json.JSONDecoder().raw_decode(body, start)
    except ValueError:
        return None
    per_minute = []
    for entry in limits if isinstance(limits, list) else []:
        if not isinstance(entry, dict) or entry.get("rateLimitType") != "REQUEST_WEIGHT":
            continue
        seconds = _INTERVAL_SECONDS.get(entry.get("interval")) or 0
        try:
            seconds *= int(entry.get("intervalNum", 1))
            limit = int(entry["limit"])
        except (KeyError, TypeError, ValueError):
            continue
        if seconds > 0 and limit > 0:
            # The shared limit may spend a minute's budget in one burst (its capacity, or a whole fixed
            # window at once), so a window shorter than a minute must hold all of it: such a limit
            # counts as itself per minute (50 per 10 s is 50, not 300). Safe, at the cost of leaving
            # most of a short window unused; Binance announces REQUEST_WEIGHT per minute.
            per_minute.append(limit if seconds < 60 else limit * 60 // seconds)
    return min(per_minute, default=None)


_DEFAULT_PROFILE = ExchangeProfile()

MARKETS_TTL_SECONDS = 3600.0

# The exchange's clock is read with one time request this often; in between it is our monotonic clock
# plus the offset that request measured, so a run costs no extra request (Binance: 1 weight each, which
# at 2,000 runs a minute is a third of the budget).
SERVER_CLOCK_TTL_SECONDS = 600.0
# Two clocks drift apart by up to ~100 ppm: the estimate runs that much slow, so it stays early.
_CLOCK_DRIFT = 1e-4
# An answer's Date header (whole seconds) further than this from the estimate means a clock jumped
# (the exchange's or ours): the offset is measured again before the next run trusts it.
_CLOCK_DATE_TOLERANCE_SECONDS = 2.0

# The exchange clock per (exchange id, urls/options): (our monotonic time, server ms) at one answer.
_clock_cache: dict[str, tuple[float, int]] = {}
_clock_lock = threading.Lock()

# What ccxt's set_markets_from_exchange copies from its source exchange.
_MARKET_ATTRIBUTES = (
    "markets",
    "markets_by_id",
    "symbols",
    "ids",
    "currencies",
    "currencies_by_id",
    "baseCurrencies",
    "quoteCurrencies",
    "codes",
)


@dataclasses.dataclass(frozen=True)
class _SharedMarkets:
    loaded_at: float  # monotonic
    source: SimpleNamespace  # the _MARKET_ATTRIBUTES, id and options of the exchange that loaded them
    announced: int | None  # the weight per minute its exchangeInfo announced


# Loaded markets per (exchange id, urls/options), shared by the clients of this process' threads, and the
# lock held by the one thread loading them.
_markets_cache: dict[str, _SharedMarkets] = {}
_markets_loading: dict[str, threading.Lock] = {}
_markets_lock = threading.Lock()


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# Keys of ccxt's `urls` that name pages for people (logos, docs, fee tables), never a request's target.
_PAGE_URL_KEYS = frozenset({"logo", "doc", "fees", "referral", "api_management"})


def _url_hosts(exchange: ccxt.Exchange, value: object, path: str) -> list[tuple[str, str]]:
    """(host, key path) of every URL in `value`, with ccxt's `{hostname}` filled in as ccxt does."""
    found = []
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            host = urlsplit(exchange.implode_hostname(item)).hostname
            if host:
                found.append((host.lower(), where))
        elif isinstance(item, dict):
            stack.extend((f"{where}.{key}", child) for key, child in item.items())
        elif isinstance(item, list):
            stack.extend((f"{where}[{index}]", child) for index, child in enumerate(item))
    return found


def _request_hosts(exchange: ccxt.Exchange) -> list[tuple[str, str]]:
    """Where this instance may send requests: its effective `urls` (page links aside) and its proxies."""
    urls = {key: value for key, value in (exchange.urls or {}).items() if key not in _PAGE_URL_KEYS}
    hosts = _url_hosts(exchange, urls, "options.urls")
    for name, value in vars(exchange).items():
        # proxy, proxyUrl, httpProxy, httpsProxy, socksProxy, proxies... in both ccxt spellings. A proxy
        # sees what goes through it (a CORS-style proxyUrl sees the whole request), so it counts as a host.
        if "prox" in name.lower() and value and isinstance(value, str | dict | list):
            hosts.extend(_url_hosts(exchange, value, f"options.{name}"))
    return hosts


@functools.cache
def exchange_hosts(exchange_id: str) -> frozenset[str]:
    """The hosts of an exchange's own API, test, demo and web URLs, as its ccxt class describes them."""
    return frozenset(host for host, _ in _request_hosts(getattr(ccxt, exchange_id)()))


def credential_host_error(exchange_id: str, host: str, where: str) -> str | None:
    """Why credentials may not go to `host` (found at `where`); None when it is the exchange's or allowed."""
    allowed = {entry.strip().lower() for entry in settings.CREDENTIAL_HOSTS_ALLOWED if entry.strip()}
    if host in exchange_hosts(exchange_id) or host in allowed:
        return None
    own = sorted(exchange_hosts(exchange_id))
    listed = ", ".join(own[:6]) + (", ..." if len(own) > 6 else "")
    return (
        f"{exchange_id}: credentials are not sent to {host} ({where}): it is not one of the exchange's own hosts "
        f"({listed}). An operator can allow it with the CREDENTIAL_HOSTS_ALLOWED setting."
    )


class CcxtClient:
    """Any ccxt exchange, synchronous, one instance per thread (a ccxt instance holds a requests session).

    With credentials, every host the instance may send a request to must be the exchange's own or in
    CREDENTIAL_HOSTS_ALLOWED: construction refuses otherwise (PermanentExchangeError), and each request
    is checked again before it leaves, whatever URL the exchange's code built.
    """

    def __init__(
        self,
        exchange_id: str,
        options: dict | None = None,
        credentials: dict[str, str] | None = None,
        weight_limit_per_minute: int | None = None,
        bucket_capacity: float | None = None,
        refill_per_second: float | None = None,
    ) -> None:
        self.exchange_id = exchange_id
        self.profile = PROFILES.get(exchange_id, _DEFAULT_PROFILE)
        config = _deep_merge(self.profile.default_config, options or {})
        # Our shared, database-backed limiter governs; ccxt's in-process throttle would only add waits
        # that no other worker knows about.
        config["enableRateLimit"] = False
        config.update(credentials or {})
        self.exchange: ccxt.Exchange = getattr(ccxt, exchange_id)(config)
        if credentials:
            for host, where in _request_hosts(self.exchange):
                error = credential_host_error(exchange_id, host, where)
                if error is not None:
                    raise PermanentExchangeError(error)
            self._send = self.exchange.fetch
            self.exchange.fetch = self._fetch_own_hosts_only
        self._markets_key = json.dumps([exchange_id, options or {}], sort_keys=True, default=str)
        self._guard = _Guard(
            exchange_id, weight_limit_per_minute, bucket_capacity, refill_per_second, self.profile.weight_window_seconds
        )
        self.stats = self._guard.stats
        self._markets_loaded_at: float | None = None
        # The status and body of the last answer, for classifying a failure by what the exchange said.
        self._status: int | None = None
        self._body: Any = None
        self._announced: int | None = None
        self._on_rest_response = self.exchange.on_rest_response
        self.exchange.on_rest_response = self._record_answer

    def _record_answer(self, code: int, reason: str, url: str, method: str, headers: Any, body: Any, *rest: Any) -> Any:
        # ccxt hands every HTTP answer through on_rest_response before it parses or maps it to an error.
        self._status, self._body = code, body
        self._check_clock(headers)
        if self.profile.announces_limits and isinstance(body, str) and url.endswith("/exchangeInfo"):
            self._announced = announced_weight_per_minute(body)
        return self._on_rest_response(code, reason, url, method, headers, body, *rest)

    def _answer(self) -> Answer | None:
        return Answer.from_body(self._status, self._body) if self._status is not None else None

    def __repr__(self) -> str:
        return f"<CcxtClient {self.exchange_id}>"

    def _fetch_own_hosts_only(
        self, url: str, method: str = "GET", headers: dict | None = None, body: str | None = None
    ) -> Any:
        # ccxt calls fetch() with the final URL of every request; checking here also covers URLs an
        # exchange's code builds from its options rather than from `urls`.
        host = (urlsplit(url).hostname or "").lower()
        error = credential_host_error(self.exchange_id, host, "a request")
        if error is not None:
            raise PermanentExchangeError(error)
        return self._send(url, method, headers, body)

    def _headers(self) -> Any:
        return self.exchange.last_response_headers

    def _request(self, weight: int, send: Callable[[], T]) -> T:
        def attempt() -> T:
            # What a previous attempt was answered must not be mistaken for this one's when it fails early.
            self.exchange.last_response_headers = None
            self._status = self._body = None
            return send()

        try:
            return self._guard.call(weight, attempt, self._headers, self._answer)
        finally:
            self._body = None  # an exchangeInfo body weighs megabytes

    def _ensure_markets(self) -> None:
        """Markets loaded once per process and TTL, shared by every thread's client without re-parsing.

        Binance's exchangeInfo weighs 20 and parsing it costs tens of milliseconds, and the clients of all
        worker threads go stale at the same moment. One thread reloads; the others keep using the markets
        they have until the new ones are in (a listing change can wait a few seconds), or wait for it when
        they have none yet.
        """
        now = time.monotonic()
        if self._markets_loaded_at is not None and now - self._markets_loaded_at < MARKETS_TTL_SECONDS:
            return
        with _markets_lock:
            shared = _markets_cache.get(self._markets_key)
            loading = _markets_loading.setdefault(self._markets_key, threading.Lock())
        if shared is None or now - shared.loaded_at >= MARKETS_TTL_SECONDS:
            have_markets = bool(self.exchange.markets)
            if not loading.acquire(blocking=not have_markets):
                return  # another thread is reloading; these markets serve until it is done
            try:
                with _markets_lock:
                    shared = _markets_cache.get(self._markets_key)
                if shared is None or time.monotonic() - shared.loaded_at >= MARKETS_TTL_SECONDS:
                    shared = self._load_markets()
            finally:
                loading.release()
        if self.exchange.markets is not shared.source.markets:
            self.exchange.set_markets_from_exchange(shared.source)
        if shared.announced is not None:
            # Before the first klines request: from now on this client never spends more than announced.
            self._guard.learn_announced(shared.announced)
        self._markets_loaded_at = shared.loaded_at

    def _load_markets(self) -> "_SharedMarkets":
        self._announced = None
        self._request(self.profile.markets_weight, lambda: self.exchange.load_markets(reload=True))
        # A snapshot, not this instance: its attributes are replaced one by one by its next reload.
        source = SimpleNamespace(
            id=self.exchange.id,
            options=dict(self.exchange.options),
            **{name: getattr(self.exchange, name) for name in _MARKET_ATTRIBUTES},
        )
        shared = _SharedMarkets(time.monotonic(), source, self._announced)
        with _markets_lock:
            _markets_cache[self._markets_key] = shared
        return shared

    def page_limit(self) -> int:
        if self.profile.page_limit:
            return self.profile.page_limit
        features = (self.exchange.features or {}).get("spot") or {}
        limit = (features.get("fetchOHLCV") or {}).get("limit")
        return int(limit) if limit else 500

    def request_weight(self, timeframe: str, limit: int) -> int:
        return self.profile.klines_weight

    def markets(self) -> list[str]:
        self._ensure_markets()
        return sorted(symbol for symbol, market in self.exchange.markets.items() if market.get("active") is not False)

    def fetch_markets(self) -> list[dict]:
        """Every market the exchange lists now (ccxt's unified market dicts), fetched afresh: the markets
        request's weight comes out of the shared bucket; the loaded markets collection uses are left alone."""
        return self._request(self.profile.markets_weight, self.exchange.fetch_markets)

    def timeframes(self) -> list[str]:
        return list((self.exchange.timeframes or {}).keys())

    def server_time_ms(self) -> int:
        """The exchange's clock, never ahead of it: candles are closed when ts + timeframe <= this.

        One time request per SERVER_CLOCK_TTL_SECONDS per process (and exchange configuration); in between,
        the server time it returned plus the monotonic time since its answer arrived. The server read its
        clock before it answered, so at arrival its clock shows at least that value: the estimate errs
        early by up to the round trip, and by the drift allowance, never late.
        """
        if not self.exchange.has.get("fetchTime"):
            return int(time.time() * 1000)
        with _clock_lock:
            anchor = _clock_cache.get(self._markets_key)
        now = time.monotonic()
        if anchor is not None and now - anchor[0] < SERVER_CLOCK_TTL_SECONDS:
            return anchor[1] + math.floor((now - anchor[0]) * 1000.0 * (1.0 - _CLOCK_DRIFT))
        server = int(self._request(self.profile.time_weight, self.exchange.fetch_time))
        with _clock_lock:
            _clock_cache[self._markets_key] = (time.monotonic(), server)
        return server

    def _check_clock(self, headers: Any) -> None:
        """Forget the kept offset when an answer's Date header says a clock jumped (see server_time_ms)."""
        with _clock_lock:
            anchor = _clock_cache.get(self._markets_key)
        date = headers.get("Date") if anchor is not None and headers else None
        if not date:
            return
        try:
            said = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        estimate = (anchor[1] + (time.monotonic() - anchor[0]) * 1000.0) / 1000.0
        # The header truncates to the second: the server's clock was in [said, said + 1) when it answered.
        if not said - _CLOCK_DATE_TOLERANCE_SECONDS <= estimate <= said + 1 + _CLOCK_DATE_TOLERANCE_SECONDS:
            with _clock_lock:
                if _clock_cache.get(self._markets_key) == anchor:
                    del _clock_cache[self._markets_key]

    def fetch_ohlcv(self, symbol: str, timeframe: str, since_ms: int, limit: int) -> list[list[float]]:
        self._ensure_markets()
        if symbol not in self.exchange.markets:
            raise PermanentExchangeError(
                f"{self.exchange_id}: symbol {symbol!r} is not listed by the exchange "
                f"(e.g. {', '.join(sorted(self.exchange.markets)[:5])})"
            )
        timeframes = self.exchange.timeframes or {}
        if timeframes and timeframe not in timeframes:
            raise PermanentExchangeError(
                f"{self.exchange_id}: timeframe {timeframe!r} is not offered; it offers {', '.join(timeframes)}"
            )

        if self.profile.raw_klines:
            return self._request(
                self.request_weight(timeframe, limit), self._raw_klines(symbol, timeframe, since_ms, limit)
            )

        def send() -> list[list[float]]:
            rows = self.exchange.fetch_ohlcv(symbol, timeframe, since=since_ms, limit=limit)
            if not isinstance(rows, list) or any(not isinstance(row, list) for row in rows):
                # ccxt hands back the raw text of a body it could not parse as JSON (a truncated 200).
                raise ccxt.BadResponse(f"unreadable klines response ({type(rows).__name__})")
            return rows

        return self._request(self.request_weight(timeframe, limit), send)

    def _raw_klines(self, symbol: str, timeframe: str, since_ms: int, limit: int) -> Callable[[], list[list[float]]]:
        """The exchange's klines endpoint called through ccxt's implicit method, rows converted here."""
        endpoint = getattr(self.exchange, self.profile.raw_klines or "")
        params = {
            "symbol": self.exchange.markets[symbol]["id"],
            "interval": (self.exchange.timeframes or {}).get(timeframe, timeframe),
            "startTime": int(since_ms),
            "limit": int(limit),
        }

        def send() -> list[list[float]]:
            raw = endpoint(params)
            if not isinstance(raw, list):
                # ccxt hands back the raw text of a body it could not parse as JSON (a truncated 200).
                raise ccxt.BadResponse(f"unreadable klines response ({type(raw).__name__})")
            try:
                return [
                    [int(row[0]), float(row[1]), float(row[2]), float(row[3]), float(row[4]), float(row[5])]
                    for row in raw
                ]
            except (TypeError, ValueError, IndexError) as exc:
                raise ccxt.BadResponse(f"unreadable klines row ({exc})") from exc

        return send


# --- The simulated exchange ---------------------------------------------------------------------------

# Listing dates, so the simulated history starts somewhere plausible and "before listing" is exercised.
SIMULATED_MARKETS: dict[str, tuple[int, float]] = {
    # symbol: (listing open time in UTC ms, starting price)
    "BTC/USDT": (1502928000000, 4300.0),  # 2017-08-17
    "ETH/USDT": (1502928000000, 300.0),
    "BNB/USDT": (1509926400000, 1.5),  # 2017-11-06
    "XRP/USDT": (1525392000000, 0.7),  # 2018-05-04
    "SOL/USDT": (1597104000000, 3.0),  # 2020-08-11
    "DOGE/USDT": (1562284800000, 0.003),  # 2019-07-05
}


def _simulated_market(symbol: str) -> dict:
    base, quote = symbol.split("/")
    return {
        "id": symbol.replace("/", ""),
        "symbol": symbol,
        "base": base,
        "quote": quote,
        "type": "spot",
        "spot": True,
        "active": True,
        "precision": {"price": 1e-8, "amount": 1e-8},
        "limits": {"amount": {"min": 1e-8, "max": None}, "cost": {"min": 1.0, "max": None}},
    }


def _unit(*parts: object) -> float:
    """A deterministic uniform number in [0, 1) from its key (blake2b, so no global random state)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return struct.unpack(">Q", digest)[0] / 2.0**64


class SimulatedClient:
    """An offline exchange with deterministic candles: re-fetching any range returns identical rows.

    The price is a multi-scale random path: value noise at periods from 4 minutes to 64 days, seeded by
    (symbol, scale, lattice point). Any slot is computed from its own time alone (O(1) per candle), so a
    page anywhere in the history costs the same, and candles of different timeframes agree with each
    other (a 1h candle opens where its first 1m candle opens). Options (the connector's `options`):
    `latency_ms` per request, `failure_rate` (share of requests failing with a transient error), `seed`.
    """

    # Period (ms) and amplitude (log-price) of each noise scale.
    _SCALES = [(4 * 60_000 * 4**k, 0.0015 * 2.2**k) for k in range(9)]

    def __init__(
        self,
        options: dict | None = None,
        weight_limit_per_minute: int | None = None,
        bucket_capacity: float | None = None,
        refill_per_second: float | None = None,
    ) -> None:
        options = options or {}
        self.exchange_id = SIMULATED
        self.latency = float(options.get("latency_ms", 0)) / 1000.0
        self.failure_rate = float(options.get("failure_rate", 0.0))
        self.seed = str(options.get("seed", "datacollector"))
        self._random = random.Random()
        self._guard = _Guard(SIMULATED, weight_limit_per_minute, bucket_capacity, refill_per_second)
        self.stats = self._guard.stats

    def __repr__(self) -> str:
        return "<SimulatedClient>"

    def page_limit(self) -> int:
        return 1000

    def request_weight(self, timeframe: str, limit: int) -> int:
        return 1

    def markets(self) -> list[str]:
        return sorted(SIMULATED_MARKETS)

    def fetch_markets(self) -> list[dict]:
        return self._guard.call(1, lambda: [_simulated_market(symbol) for symbol in sorted(SIMULATED_MARKETS)])

    def timeframes(self) -> list[str]:
        return list(SIMULATED_TIMEFRAMES)

    def server_time_ms(self) -> int:
        return int(time.time() * 1000)

    def fetch_ohlcv(self, symbol: str, timeframe: str, since_ms: int, limit: int) -> list[list[float]]:
        return self._guard.call(
            self.request_weight(timeframe, limit), lambda: self._klines(symbol, timeframe, since_ms, limit)
        )

    def _klines(self, symbol: str, timeframe: str, since_ms: int, limit: int) -> list[list[float]]:
        if self.latency:
            time.sleep(self.latency)
        if self.failure_rate and self._random.random() < self.failure_rate:
            raise ccxt.ExchangeNotAvailable("simulated: 503 Service Unavailable (injected failure)")
        if symbol not in SIMULATED_MARKETS:
            raise ccxt.BadSymbol(f"simulated does not have market symbol {symbol}")
        if timeframe not in SIMULATED_TIMEFRAMES:
            raise ccxt.BadRequest(f"simulated: invalid interval {timeframe}")
        step = timeframe_ms(timeframe)
        listing, _ = SIMULATED_MARKETS[symbol]
        now = self.server_time_ms()
        # Like Binance: the first `limit` candles at or after `since`, the forming one included.
        first = max(-(-since_ms // step) * step, -(-listing // step) * step)
        rows = []
        for ts in range(first, now + 1, step):
            if len(rows) >= limit:
                break
            rows.append(self.candle(symbol, timeframe, ts))
        return rows

    def _log_price(self, symbol: str, ts: int) -> float:
        total = 0.0
        for index, (period, amplitude) in enumerate(self._SCALES):
            position = ts / period
            cell = math.floor(position)
            frac = position - cell
            left = _unit(self.seed, symbol, index, cell) * 2 - 1
            right = _unit(self.seed, symbol, index, cell + 1) * 2 - 1
            smooth = frac * frac * (3 - 2 * frac)
            total += amplitude * (left + (right - left) * smooth)
        return total

    def candle(self, symbol: str, timeframe: str, ts: int) -> list[float]:
        """The candle opening at `ts`; a pure function of (seed, symbol, timeframe, ts)."""
        step = timeframe_ms(timeframe)
        _, base = SIMULATED_MARKETS[symbol]
        open_ = base * math.exp(self._log_price(symbol, ts))
        close = base * math.exp(self._log_price(symbol, ts + step))
        # Wicks beyond the open/close, scaled by the candle's length so longer candles range further.
        spread = 0.0008 * math.sqrt(step / 60_000)
        high = max(open_, close) * (1 + spread * _unit(self.seed, symbol, timeframe, ts, "h"))
        low = min(open_, close) * (1 - spread * _unit(self.seed, symbol, timeframe, ts, "l"))
        volume = (step / 60_000) * (5 + 95 * _unit(self.seed, symbol, timeframe, ts, "v"))
        return [ts, round(open_, 8), round(high, 8), round(low, 8), round(close, 8), round(volume, 8)]


# --- Factory --------------------------------------------------------------------------------------------

_local = threading.local()


def credential_env_error(field: str, name: str) -> str | None:
    """Why `name` may not be the credential variable of connector field `field`; None when it may.

    Connector.clean() reports it; `_credentials()` checks again before reading, for rows stored before
    the rule (or before an operator narrowed CREDENTIAL_ENV_PATTERN).
    """
    pattern = settings.CREDENTIAL_ENV_PATTERN
    if not _ENV_NAME_RE.fullmatch(name) or not re.fullmatch(pattern, name):
        return (
            f"{field} must be the NAME of an environment variable matching CREDENTIAL_ENV_PATTERN ({pattern}), "
            "e.g. BINANCE_API_KEY or BINANCE_SECRET; never the key itself."
        )
    upper = name.upper()
    if upper in settings.RESERVED_ENV_NAMES or upper.startswith(settings.RESERVED_ENV_PREFIXES):
        return (
            f"{field} cannot be {name}: the collector itself or its platform uses that variable "
            f"(reserved: {', '.join(sorted(settings.RESERVED_ENV_NAMES))} and names starting with "
            f"{', '.join(settings.RESERVED_ENV_PREFIXES)}). Name a variable of your own, e.g. BINANCE_API_KEY."
        )
    return None


def _credentials(connector: Any) -> dict[str, str]:
    """ccxt credentials read from the environment variables the connector names (never stored).

    A name the rules refuse stops the connector's jobs with the reason (PermanentExchangeError) rather
    than being skipped: skipping would run on without the credentials and hide a row that tried to read
    one of the project's own variables until an authentication error surfaced somewhere else.
    """
    credentials = {}
    for field, key in CREDENTIAL_ENV_FIELDS.items():
        name = getattr(connector, field, "") or ""
        if not name:
            continue
        error = credential_env_error(field, name)
        if error is not None:
            logger.warning("connector %s names a refused credential variable in %s", connector.exchange_id, field)
            raise PermanentExchangeError(f"{connector.exchange_id}: {error} Fix the connector, then resume its jobs.")
        if os.environ.get(name):
            credentials[key] = os.environ[name]
    return credentials


def get_client(connector: Any) -> ExchangeClient:
    """The client of a connector, reused within a thread while the connector's settings do not change.

    Reuse keeps the loaded markets (Binance exchangeInfo weighs 20) and the HTTP session; one instance
    per thread because neither ccxt's sync client nor its session is meant to be shared across threads.
    """
    # What the exchange's used-weight header is measured against: its published limit where we know
    # it, else the most this connector's bucket can grant in one minute.
    profile = PROFILES.get(connector.exchange_id, _DEFAULT_PROFILE)
    weight_limit = profile.weight_limit_per_minute or (
        (connector.rate_limit_weight_per_minute or 0) + (connector.rate_limit_burst or 0) or None
    )
    key = json.dumps(
        [
            connector.exchange_id,
            connector.options,
            weight_limit,
            connector.rate_limit_burst,
            connector.rate_limit_weight_per_minute,
            [getattr(connector, field, "") for field in CREDENTIAL_ENV_FIELDS],
        ],
        sort_keys=True,
        default=str,
    )
    per_minute = connector.rate_limit_weight_per_minute
    refill = per_minute / 60.0 if per_minute is not None else None
    cache: dict[str, ExchangeClient] = _local.__dict__.setdefault("clients", {})
    client = cache.get(key)
    if client is None:
        if connector.exchange_id == SIMULATED:
            client = SimulatedClient(connector.options, weight_limit, connector.rate_limit_burst, refill)
        elif connector.exchange_id in ccxt.exchanges:
            client = CcxtClient(
                connector.exchange_id,
                connector.options,
                _credentials(connector),
                weight_limit,
                connector.rate_limit_burst,
                refill,
            )
        else:
            raise PermanentExchangeError(f"unknown exchange id {connector.exchange_id!r}: not a ccxt exchange")
        cache[key] = client
    return client


def clear_clients() -> None:
    """Forget this thread's clients and the shared markets (tests, or after a connector changed in place)."""
    _local.__dict__.pop("clients", None)
    with _markets_lock:
        _markets_cache.clear()
    with _clock_lock:
        _clock_cache.clear()
    with _circuit_lock:
        _circuit_closed_at.clear()
