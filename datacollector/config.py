"""The collector's YAML configuration, loaded into typed, frozen dataclasses and validated up front.

`get_config()` reads `settings.COLLECTOR_CONFIG` once per process. Every problem is reported as a
`ConfigError` naming the dotted key and what is accepted, so a bad file stops start-up with a clear line.
"""

import dataclasses
import functools
import types
import typing
from pathlib import Path

import yaml
from django.conf import settings

from apps.marketdata.timeframes import is_valid_timeframe, timeframe_error


class ConfigError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class RateLimitConfig:
    weight_per_minute: int
    burst: int

    @property
    def refill_per_second(self) -> float:
        return self.weight_per_minute / 60.0


@dataclasses.dataclass(frozen=True)
class MacdConfig:
    fast: int = 12
    slow: int = 26
    signal: int = 9


@dataclasses.dataclass(frozen=True)
class BollingerConfig:
    period: int = 20
    std: float = 2.0


@dataclasses.dataclass(frozen=True)
class IndicatorConfig:
    rsi: tuple[int, ...] = (14,)
    ema: tuple[int, ...] = (12, 26, 50)
    sma: tuple[int, ...] = (20, 50, 200)
    macd: tuple[MacdConfig, ...] = (MacdConfig(),)
    bollinger: tuple[BollingerConfig, ...] = (BollingerConfig(),)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    workers: int = 8
    batch_size: int = 10
    lease_seconds: int = 120
    interval_seconds: float = 1.0
    schedule_delay_seconds: float = 2.0
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 900.0
    # The fleet registry: each process writes a heartbeat this often; one silent for longer is lost.
    heartbeat_seconds: float = 10.0
    lost_after_seconds: float = 60.0


@dataclasses.dataclass(frozen=True)
class CollectionConfig:
    default_history_candles: int = 1000
    # How long `backfill` waits for the database to come back before it stops with its summary.
    database_outage_seconds: float = 300.0
    # A job fails only after this long without a page: transient exchange errors are retried until then.
    no_progress_timeout_seconds: float = 600.0


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """How a request is retried inside the exchange client, and the shared circuit breaker's thresholds."""

    initial_seconds: float = 0.5  # ceiling of the first jittered backoff; doubles per failure
    max_seconds: float = 30.0  # cap of the backoff
    acquire_timeout_seconds: float = 120.0  # longest wait for the shared rate limit in one attempt
    circuit_threshold: int = 8  # consecutive transient failures, across every worker, that open the circuit
    circuit_cooldown_seconds: float = 60.0  # open this long, then half-open: one trial request at a time
    circuit_successes_to_close: int = 3  # trial successes in a row that close it again


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    """Days candles are kept, per timeframe ({"1m": 90}); a timeframe not listed keeps everything.

    A connector's retention_days, when set, takes the place of these for its exchange.
    """

    days: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CollectorConfig:
    rate_limits: dict[str, RateLimitConfig]
    indicators: IndicatorConfig = IndicatorConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    collection: CollectionConfig = CollectionConfig()
    retry: RetryConfig = RetryConfig()
    retention: RetentionConfig = RetentionConfig()

    def rate_limit_for(self, exchange_id: str) -> RateLimitConfig:
        return self.rate_limits.get(exchange_id) or self.rate_limits["default"]


# Fields that must be strictly positive; everything else numeric must be >= 0.
_POSITIVE = {
    "weight_per_minute",
    "burst",
    "workers",
    "batch_size",
    "lease_seconds",
    "period",
    "std",
    "fast",
    "slow",
    "signal",
    "rsi",
    "ema",
    "sma",
    "no_progress_timeout_seconds",
    "circuit_threshold",
    "circuit_successes_to_close",
    "heartbeat_seconds",
    "lost_after_seconds",
}


# Upper bounds of indicator parameters: a window longer than this is no indicator anyone collects, and
# the warm-up history an update reads grows with it (an EMA reads ~13 periods back).
_MAXIMUM = {
    "rsi": 10_000,
    "ema": 10_000,
    "sma": 10_000,
    "period": 10_000,
    "fast": 10_000,
    "slow": 10_000,
    "signal": 10_000,
    "std": 100,
}


def _type_name(tp: typing.Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings"}.get(item)
        return f"a list of {plural}" if plural else f"a list, each item {_type_name(item)}"
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        keys = ", ".join(f.name for f in dataclasses.fields(tp))
        return f"a mapping with keys {keys}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: typing.Any, tp: typing.Any, key: str) -> typing.Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]}: unknown key; accepted keys are {', '.join(fields)}"
                if key
                else f"{unknown[0]}: unknown key; accepted keys are {', '.join(fields)}"
            )
        kwargs = {}
        for name, field in fields.items():
            path = f"{key}.{name}" if key else name
            if name in value:
                kwargs[name] = _convert(value[name], field.type, path)
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: required key is missing ({_type_name(field.type)})")
        return tp(**kwargs)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_type, _) = typing.get_args(tp)
        return tuple(_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        _, item_type = typing.get_args(tp)
        return {str(k): _convert(v, item_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        # YAML booleans are ints in Python; an integer where a float is expected is fine.
        ok = isinstance(value, int) if tp is int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        leaf = key.rsplit(".", 1)[-1].split("[")[0]
        if leaf in _POSITIVE and value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value!r}")
        if key.startswith("indicators.") and leaf in _MAXIMUM and value > _MAXIMUM[leaf]:
            raise ConfigError(f"{key}: must be at most {_MAXIMUM[leaf]}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, types.UnionType):  # pragma: no cover - no optional fields yet
        raise ConfigError(f"{key}: unsupported type {tp}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def load_config(path: str | Path) -> CollectorConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"collector configuration file not found: {path} (set COLLECTOR_CONFIG)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        config = _convert(data, CollectorConfig, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if "default" not in config.rate_limits:
        raise ConfigError(f"{path}: rate_limits.default: required key is missing (weight_per_minute, burst)")
    if config.retry.initial_seconds > config.retry.max_seconds:
        raise ConfigError(
            f"{path}: retry.initial_seconds ({config.retry.initial_seconds:g}) must not exceed "
            f"retry.max_seconds ({config.retry.max_seconds:g})"
        )
    if config.scheduler.lost_after_seconds <= config.scheduler.heartbeat_seconds:
        raise ConfigError(
            f"{path}: scheduler.lost_after_seconds ({config.scheduler.lost_after_seconds:g}) must exceed "
            f"scheduler.heartbeat_seconds ({config.scheduler.heartbeat_seconds:g})"
        )
    for timeframe, days in config.retention.days.items():
        if not is_valid_timeframe(timeframe):
            raise ConfigError(f"{path}: retention.days.{timeframe}: {timeframe_error(timeframe)}")
        if days <= 0:
            raise ConfigError(
                f"{path}: retention.days.{timeframe}: must be a number of days greater than 0, got {days!r} "
                "(leave the timeframe out to keep everything)"
            )
    try:
        _check_indicators(config.indicators)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _check_indicators(indicators: IndicatorConfig) -> None:
    for macd in indicators.macd:
        if macd.fast >= macd.slow:
            raise ConfigError(f"indicators.macd: fast ({macd.fast}) must be less than slow ({macd.slow})")


def parse_indicators(data: object) -> IndicatorConfig:
    """The `indicators` section from its YAML (or JSON) form, checked as the file's is; ConfigError naming
    the key otherwise. For the indicator set stored in the database (the API's PUT)."""
    indicators = _convert(data, IndicatorConfig, "indicators")
    _check_indicators(indicators)
    return indicators


@functools.cache
def get_config() -> CollectorConfig:
    return load_config(settings.COLLECTOR_CONFIG)
