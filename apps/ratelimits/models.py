"""The per-exchange token bucket every worker on every machine shares through the database.

On PostgreSQL each operation is one atomic statement that reads the database clock
(`clock_timestamp()`), so processes on machines with skewed clocks still agree (a grant is one
UPDATE ... RETURNING; a refusal takes a second statement that counts it and computes the wait). On SQLite (one
machine, `BEGIN IMMEDIATE` configured in settings) the same arithmetic runs in Python inside a
write-locked transaction, which serializes callers just as well.

Two ways of counting. A token bucket (the default) refills evenly: at most `capacity` at once, plus
`refill_per_second`. An exchange that counts weight per fixed window (Binance: per calendar minute) gets a
window (`window_seconds` set): up to `capacity + refill_per_second * window_seconds` per window, all of it
at once if need be, as the exchange itself allows. Windows start at multiples of `window_seconds` since the
epoch on the database clock, which is taken to agree with the exchange's within a fraction of the window.
"""

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, connections, models, router, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Now
from django.db.models.signals import post_save
from django.dispatch import receiver
from django.utils import timezone
from prometheus_client import Counter

from apps.monitoring.metrics import RATE_LIMIT_WAITS
from datacollector.config import get_config

# Process-local metrics (the totals across processes live on the row: granted, denied, ...).
GRANTS = Counter("dc_ratelimit_grants_total", "Tokens requests granted by the shared bucket.", ["exchange"])
DENIALS = Counter("dc_ratelimit_denials_total", "Token requests told to wait by the shared bucket.", ["exchange"])
WAIT = Counter("dc_ratelimit_wait_seconds_total", "Seconds this process slept waiting for tokens.", ["exchange"])

# When the refill rate is zero the bucket never refills: callers are told to come back in a day.
_NO_REFILL_WAIT = 86400.0


class RateLimitTimeout(Exception):
    def __init__(self, exchange_id: str, weight: float, timeout: float, wait: float) -> None:
        super().__init__(
            f"rate limit for {exchange_id!r}: weight {weight:g} not available within the {timeout:g}s timeout "
            f"(the shared bucket asks for {wait:.3f}s more)"
        )
        self.exchange_id = exchange_id
        self.weight = weight
        self.timeout = timeout
        self.wait = wait


@dataclass(frozen=True)
class _Decision:
    tokens: float
    updated_at: datetime
    granted: bool
    wait: float
    window_started_at: datetime | None = None
    window_used: float = 0.0


def _decide(row: "RateLimit", weight: float, now: datetime) -> _Decision:
    """The bucket arithmetic of `_GRANT_SQL` and `_DENY_SQL`, in Python, for backends without them."""
    # updated_at never moves backwards, so a caller with a stale clock is credited nothing, never extra.
    now = max(now, row.updated_at)
    blocked = max([t for t in (row.blocked_until, row.circuit_open_until) if t is not None], default=None)
    blocked_wait = (blocked - now).total_seconds() if blocked is not None and blocked > now else 0.0
    if row.window_seconds is not None:
        start, used = row.window_at(now)
        if blocked_wait <= 0 and used + weight <= row.limit:
            return _Decision(row.tokens, now, True, 0.0, start, used + weight)
        window_wait = (start - now).total_seconds() + row.window_seconds if used + weight > row.limit else 0.0
        return _Decision(row.tokens, now, False, max(blocked_wait, window_wait), start, used)
    elapsed = (now - row.updated_at).total_seconds()
    refilled = min(row.capacity, row.tokens + elapsed * row.refill_per_second)
    if blocked_wait <= 0 and refilled >= weight:
        return _Decision(refilled - weight, now, True, 0.0)
    if row.refill_per_second > 0:
        token_wait = max(0.0, (weight - refilled) / row.refill_per_second)
    else:
        token_wait = _NO_REFILL_WAIT if refilled < weight else 0.0
    return _Decision(refilled, now, False, max(blocked_wait, token_wait))


# Tokens the bucket holds at t.now: refilled by elapsed database time, capped at capacity. `now` is read
# once per statement (the one-row subquery t); if the statement then waited for the row lock, another
# caller may have moved updated_at past it: elapsed is clamped at 0 and updated_at never moves back,
# so a late `now` only defers refill to the next caller and can never credit the same second twice.
_REFILLED = """LEAST(r.capacity, r.tokens + r.refill_per_second
                     * GREATEST(0, EXTRACT(EPOCH FROM (t.now - r.updated_at))::float8))"""

# A fixed window: the one t.now falls in (windows start at multiples of window_seconds since the epoch),
# never one before the window the row already counts (a `now` read before a wait for the row lock is late).
_WINDOW_START = """GREATEST(r.window_started_at,
    to_timestamp(floor(EXTRACT(EPOCH FROM t.now) / r.window_seconds) * r.window_seconds))"""
# Weight spent in that window: what the row counts if it counts that window, else nothing yet.
_WINDOW_USED = f"""(CASE WHEN r.window_started_at >= {_WINDOW_START} THEN r.window_used ELSE 0 END)"""
# What one window may spend, and what a request may weigh at most in either mode.
_LIMIT = (
    "(CASE WHEN r.window_seconds IS NULL THEN r.capacity ELSE r.capacity + r.refill_per_second * r.window_seconds END)"
)

# The grant: one UPDATE ... RETURNING that takes `weight` only if the refilled bucket (or the window) holds
# it and no pause is in force. When a concurrent caller changes the row first, PostgreSQL re-evaluates the
# WHERE and SET against the new version (READ COMMITTED), so two callers can never take the same
# tokens. No row back: refused, and _DENY_SQL counts it and says how long to wait.
_GRANT_SQL = f"""
UPDATE ratelimits_ratelimit AS r
SET tokens = CASE WHEN r.window_seconds IS NULL THEN {_REFILLED} - %(weight)s ELSE r.tokens END,
    updated_at = GREATEST(r.updated_at, t.now),
    window_started_at = CASE WHEN r.window_seconds IS NULL THEN r.window_started_at ELSE {_WINDOW_START} END,
    window_used = CASE WHEN r.window_seconds IS NULL THEN r.window_used ELSE {_WINDOW_USED} + %(weight)s END,
    granted = r.granted + 1,
    tokens_used = r.tokens_used + %(weight)s
FROM (SELECT clock_timestamp() AS now, {{commit_mode}}) AS t
WHERE r.exchange_id = %(exchange_id)s
  AND (r.blocked_until IS NULL OR r.blocked_until <= t.now)
  AND (r.circuit_open_until IS NULL OR r.circuit_open_until <= t.now)
  AND CASE WHEN r.window_seconds IS NULL THEN {_REFILLED} >= %(weight)s
           ELSE {_WINDOW_USED} + %(weight)s <= {_LIMIT} END
RETURNING {_LIMIT}
"""

# The refusal: count it (unless the weight can never fit) and report the wait until the pauses end
# and the bucket will have refilled enough. Tokens are left as they are: refill is computed lazily.
_DENY_SQL = f"""
UPDATE ratelimits_ratelimit AS r
SET denied = r.denied + CASE WHEN %(weight)s <= r.capacity THEN 1 ELSE 0 END
FROM (SELECT clock_timestamp() AS now, {{commit_mode}}) AS t
WHERE r.exchange_id = %(exchange_id)s
RETURNING {_LIMIT}, GREATEST(
    -- GREATEST skips NULLs: no pause in force gives NULL, hence the COALESCE.
    COALESCE(EXTRACT(EPOCH FROM (GREATEST(r.blocked_until, r.circuit_open_until) - t.now))::float8, 0),
    CASE WHEN r.window_seconds IS NOT NULL THEN
            CASE WHEN {_WINDOW_USED} + %(weight)s <= {_LIMIT} THEN 0
                 ELSE EXTRACT(EPOCH FROM ({_WINDOW_START} - t.now))::float8 + r.window_seconds END
         WHEN r.refill_per_second > 0 THEN (%(weight)s - {_REFILLED}) / r.refill_per_second
         WHEN {_REFILLED} >= %(weight)s THEN 0
         ELSE %(no_refill_wait)s END
)
"""

# Every caller of an exchange updates this one row, so its throughput is one over the time the row
# lock is held, and a synchronous commit holds it through a WAL flush (0.3-3 ms here, several times
# the statement). Outside a caller's transaction these statements therefore commit asynchronously
# (synchronous_commit off for that one statement's own transaction). The only risk is a database
# crash forgetting the last fraction of a second of grants: the bucket may then over-grant that much
# once, which the exchange's used-weight header (observe_used_weight) corrects. Inside a caller's
# transaction the setting would leak into the caller's commit, so there the plain variant is used.
_ASYNC = "set_config('synchronous_commit', 'off', true) AS commit_mode"
_SYNC = "NULL AS commit_mode"
_GRANT = {False: _GRANT_SQL.format(commit_mode=_ASYNC), True: _GRANT_SQL.format(commit_mode=_SYNC)}
_DENY = {False: _DENY_SQL.format(commit_mode=_ASYNC), True: _DENY_SQL.format(commit_mode=_SYNC)}
# A refusal whose computed wait is already over (tokens came back between the two statements) is
# tried again this many times before the caller is told to wait a moment.
_GRANT_ATTEMPTS = 3
_MIN_WAIT = 0.001

# The exchange told us how much of its fixed-minute budget is used: what the bucket can still grant this
# minute (its tokens plus the refill until the minute rolls over) may not exceed what is left. So the
# tokens drop to `remaining` minus that refill, below zero if need be: the bucket then grants nothing more
# until the exchange's next minute. Out of budget entirely: pause everyone until the minute rolls over.
_OBSERVE_SQL = """
WITH t AS (
    SELECT clock_timestamp() AS now
), cur AS (
    SELECT r.id, r.capacity, r.refill_per_second, r.tokens, r.updated_at, GREATEST(t.now, r.updated_at) AS now,
           EXTRACT(EPOCH FROM (date_trunc('minute', t.now) + interval '1 minute' - t.now))::float8 AS left_s
    FROM ratelimits_ratelimit r, t
    -- Most answers leave more than the bucket can grant this minute: then there is nothing to lock or write.
    WHERE r.exchange_id = %(exchange_id)s
      AND r.window_seconds IS NULL
      AND %(remaining)s < r.capacity + r.refill_per_second
          * EXTRACT(EPOCH FROM (date_trunc('minute', t.now) + interval '1 minute' - t.now))::float8
    FOR UPDATE OF r
)
UPDATE ratelimits_ratelimit AS r
SET tokens = GREATEST(-c.refill_per_second * c.left_s, LEAST(
        c.capacity,
        c.tokens + c.refill_per_second * EXTRACT(EPOCH FROM (c.now - c.updated_at))::float8,
        %(remaining)s - c.refill_per_second * c.left_s)),
    updated_at = c.now,
    blocked_until = CASE WHEN %(remaining)s <= 0
        THEN GREATEST(r.blocked_until, date_trunc('minute', c.now) + interval '1 minute')
        ELSE r.blocked_until END
FROM cur c
WHERE r.id = c.id
RETURNING r.tokens
"""

# The same news for a window: the exchange's count (which includes every client on the IP) replaces ours
# when it is higher, so the window grants only what the exchange has left. Ours may be higher: requests
# granted but not yet counted by the exchange. A count at or below ours changes nothing and writes nothing.
_OBSERVE_WINDOW_SQL = f"""
UPDATE ratelimits_ratelimit AS r
SET window_started_at = {_WINDOW_START},
    window_used = %(used)s,
    blocked_until = CASE WHEN %(remaining)s <= 0
        THEN GREATEST(r.blocked_until, {_WINDOW_START} + make_interval(secs => r.window_seconds))
        ELSE r.blocked_until END
FROM (SELECT clock_timestamp() AS now) AS t
WHERE r.exchange_id = %(exchange_id)s
  AND r.window_seconds IS NOT NULL
  AND {_WINDOW_USED} < %(used)s
RETURNING r.window_used
"""

_BLOCK_SQL = """
UPDATE ratelimits_ratelimit
SET blocked_until = GREATEST(blocked_until, clock_timestamp() + make_interval(secs => %(seconds)s)),
    tokens = 0,
    updated_at = GREATEST(updated_at, clock_timestamp())
WHERE exchange_id = %(exchange_id)s
RETURNING blocked_until
"""

# The circuit opens when the failure count reaches the threshold while it is closed; while it is half-open
# (the cooldown has passed, a trial may be in flight) any failure re-opens it at once. A failure while it
# is open (a request sent before it opened) changes nothing but the count. The locked CTE makes "did
# this call open it" exact when several workers fail at the same moment.
_FAILURE_SQL = """
WITH cur AS (
    SELECT id, circuit_failures + 1 AS failures, circuit_open_until, clock_timestamp() AS now
    FROM ratelimits_ratelimit
    WHERE exchange_id = %(exchange_id)s
    FOR UPDATE
), d AS (
    SELECT id, failures, now,
           CASE WHEN circuit_open_until IS NULL THEN failures >= %(threshold)s
                ELSE circuit_open_until <= now END AS opens
    FROM cur
)
UPDATE ratelimits_ratelimit AS r
SET circuit_failures = d.failures,
    circuit_open_until = CASE WHEN d.opens THEN d.now + make_interval(secs => %(cooldown)s)
                              ELSE r.circuit_open_until END,
    circuit_successes = CASE WHEN d.opens THEN 0 ELSE r.circuit_successes END,
    circuit_trial_until = CASE WHEN d.opens THEN NULL ELSE r.circuit_trial_until END
FROM d
WHERE r.id = d.id
RETURNING d.opens
"""

# Of the budget an exchange announces, the share the shared bucket may promise: the rest is room for
# requests made outside the collector (another program or a browser on the same IP).
ANNOUNCED_SHARE = 0.95
# A bucket capped to an announced budget keeps this share of it as its burst and refills the rest evenly.
CAPPED_BURST_SHARE = 0.1


def capped_limit(capacity: float, refill_per_second: float, announced_per_minute: int | None) -> tuple[float, float]:
    """The bucket (capacity, refill per second) that never promises more than the exchange announces.

    Exchanges like Binance count weight per fixed clock minute, and a bucket can grant its capacity plus
    a minute of refill within one such minute: that sum must stay within the announced budget. A bucket
    already within it is left as configured.
    """
    if announced_per_minute is None:
        return capacity, refill_per_second
    budget = ANNOUNCED_SHARE * announced_per_minute
    if capacity + refill_per_second * 60.0 <= budget:
        return capacity, refill_per_second
    burst = min(capacity, CAPPED_BURST_SHARE * budget)
    return burst, max(0.0, budget - burst) / 60.0


class RateLimitQuerySet(models.QuerySet):
    def _postgres(self) -> bool:
        return connections[self.db].vendor == "postgresql"

    def _fetch(self, sql: str, params: dict) -> tuple | None:
        with connections[self.db].cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone() if cursor.description else None

    def _locked(self, exchange_id: str) -> "RateLimit":
        """The row, write-locked: FOR UPDATE where supported, the BEGIN IMMEDIATE lock on SQLite."""
        return self.select_for_update().get(exchange_id=exchange_id)

    def ensure(self, exchange_id: str, limit: tuple[float, float] | None = None) -> "RateLimit":
        """The exchange's row, created if missing (race-safe) with `limit` (capacity, refill per second),
        else collector.yaml's limit for the exchange. A connector's save configures its row; `limit` is
        for callers that get to the bucket first."""
        row = self.filter(exchange_id=exchange_id).first()
        if row is not None:
            return row
        if limit is None:
            default = get_config().rate_limit_for(exchange_id)
            limit = (float(default.burst), default.refill_per_second)
        capacity, refill = limit
        try:
            with transaction.atomic(using=self.db):
                return self.create(
                    exchange_id=exchange_id,
                    capacity=capacity,
                    refill_per_second=refill,
                    tokens=capacity,
                    configured_capacity=capacity,
                    configured_refill_per_second=refill,
                )
        except IntegrityError:
            # Another process created it between our read and our insert: theirs is as good as ours.
            return self.get(exchange_id=exchange_id)

    def configure(self, exchange_id: str, capacity: float, refill_per_second: float) -> None:
        """Set the bucket's configured size and refill (capped to what the exchange announces, if known),
        keeping the tokens already spent spent."""
        self.ensure(exchange_id, (capacity, refill_per_second))
        with transaction.atomic(using=self.db):
            row = self._locked(exchange_id)
            row.configured_capacity, row.configured_refill_per_second = capacity, refill_per_second
            self._apply_cap(row)

    def learn_announced_limit(
        self,
        exchange_id: str,
        weight_per_minute: int,
        limit: tuple[float, float] | None = None,
        window_seconds: float | None = None,
    ) -> tuple["RateLimit", bool]:
        """The exchange announced its request weight per minute: cap the bucket to it. Returns the row and
        whether this call changed what was known (so the caller logs it once, not on every markets load of
        every worker). `limit` sizes the bucket if the exchange has no row yet, as in `ensure`.
        `window_seconds`: the exchange counts weight per fixed window that long, and so does the row from
        now on (None: a token bucket)."""
        self.ensure(exchange_id, limit)
        with transaction.atomic(using=self.db):
            row = self._locked(exchange_id)
            if (row.announced_weight_per_minute, row.window_seconds) == (weight_per_minute, window_seconds):
                return row, False
            row.announced_weight_per_minute, row.window_seconds = weight_per_minute, window_seconds
            self._apply_cap(row)
            return row, True

    def _apply_cap(self, row: "RateLimit") -> None:
        configured = (
            row.configured_capacity if row.configured_capacity is not None else row.capacity,
            row.configured_refill_per_second if row.configured_refill_per_second is not None else row.refill_per_second,
        )
        row.configured_capacity, row.configured_refill_per_second = configured
        row.capacity, row.refill_per_second = capped_limit(*configured, row.announced_weight_per_minute)
        row.tokens = min(row.tokens, row.capacity)
        row.save(
            update_fields=[
                "announced_weight_per_minute",
                "window_seconds",
                "configured_capacity",
                "configured_refill_per_second",
                "capacity",
                "refill_per_second",
                "tokens",
            ]
        )

    def acquire_token(self, exchange_id: str, weight: float, limit: tuple[float, float] | None = None) -> float:
        """Take `weight` from the exchange's bucket: 0.0 if granted, else the seconds to wait first.

        Nothing is taken on a refusal, so the caller sleeps the returned time and asks again. `limit`
        (capacity, refill per second) sizes the bucket if this is the exchange's first request.
        """
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight!r}")
        for _attempt in range(2):
            outcome = self._acquire_once(exchange_id, weight)
            if outcome is not None:
                break
            self.ensure(exchange_id, limit)
        else:  # pragma: no cover - the row was deleted between ensure() and the retry
            raise RateLimit.DoesNotExist(f"no rate limit row for {exchange_id!r}")
        ok, wait, capacity = outcome
        if weight > capacity:
            raise ValueError(
                f"request weight {weight:g} exceeds the capacity {capacity:g} of the {exchange_id!r} rate limit "
                "bucket: it could never be granted; raise the connector's burst or split the request"
            )
        (GRANTS if ok else DENIALS).labels(exchange_id).inc()
        return 0.0 if ok else float(wait)

    def _acquire_once(self, exchange_id: str, weight: float) -> tuple[bool, float, float] | None:
        """(granted, wait, capacity), or None when the exchange has no row yet."""
        if self._postgres():
            params = {"exchange_id": exchange_id, "weight": float(weight), "no_refill_wait": _NO_REFILL_WAIT}
            in_transaction = connections[self.db].in_atomic_block
            for _attempt in range(_GRANT_ATTEMPTS):
                granted = self._fetch(_GRANT[in_transaction], params)
                if granted is not None:
                    return (True, 0.0, granted[0])
                refused = self._fetch(_DENY[in_transaction], params)
                if refused is None:
                    return None
                capacity, wait = refused
                if wait > 0 or weight > capacity:
                    return (False, wait, capacity)
            return (False, _MIN_WAIT, capacity)
        with transaction.atomic(using=self.db):
            try:
                row = self._locked(exchange_id)
            except RateLimit.DoesNotExist:
                return None
            if weight > row.limit:
                return (False, 0.0, row.limit)
            decision = _decide(row, weight, timezone.now())
            self.filter(pk=row.pk).update(
                tokens=decision.tokens,
                updated_at=decision.updated_at,
                window_started_at=decision.window_started_at,
                window_used=decision.window_used,
                granted=F("granted") + int(decision.granted),
                denied=F("denied") + int(not decision.granted),
                tokens_used=F("tokens_used") + (weight if decision.granted else 0),
            )
            return (decision.granted, decision.wait, row.limit)

    def acquire(
        self, exchange_id: str, weight: float, timeout: float = 60.0, limit: tuple[float, float] | None = None
    ) -> float:
        """Block until `weight` is granted; returns the seconds waited.

        Sleeps exactly the wait the bucket reports (no polling loop); another process may take the
        refilled tokens first, in which case it asks again. Raises `RateLimitTimeout` without
        sleeping when the next wait would pass `timeout`.
        """
        waited = 0.0
        try:
            while True:
                wait = self.acquire_token(exchange_id, weight, limit)
                if wait <= 0:
                    return waited
                if waited + wait > timeout:
                    raise RateLimitTimeout(exchange_id, weight, timeout, wait)
                RATE_LIMIT_WAITS.labels(exchange_id).inc()
                time.sleep(wait)
                waited += wait
        finally:
            if waited > 0:
                # One write per acquire rather than per sleep keeps the hot row's write rate down.
                self.filter(exchange_id=exchange_id).update(wait_seconds=F("wait_seconds") + waited)
                WAIT.labels(exchange_id).inc(waited)

    def observe_used_weight(self, exchange_id: str, used_weight: float, limit: float) -> None:
        """The exchange reported `used_weight` of its `limit` for the current minute (Binance
        X-MBX-USED-WEIGHT-1M): drain the shared bucket so it never offers more than the exchange allows."""
        remaining = float(limit) - float(used_weight)
        # The caller made a request, so acquire_token has created the row already.
        if self._postgres():
            params = {"exchange_id": exchange_id, "remaining": remaining, "used": float(used_weight)}
            # Each statement matches only rows of its own mode, and only when there is something to write.
            if self._fetch(_OBSERVE_WINDOW_SQL, params) is None:
                self._fetch(_OBSERVE_SQL, params)
            return
        with transaction.atomic(using=self.db):
            row = self.select_for_update().filter(exchange_id=exchange_id).first()
            now = timezone.now()
            if row is not None and row.window_seconds is not None:
                start, used = row.window_at(max(now, row.updated_at))
                if used < used_weight:
                    row.window_started_at, row.window_used = start, float(used_weight)
                    if remaining <= 0:
                        end = start + timedelta(seconds=row.window_seconds)
                        row.blocked_until = max(row.blocked_until or end, end)
                    row.save(update_fields=["window_started_at", "window_used", "blocked_until"])
                return
            next_minute = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
            left = (next_minute - now).total_seconds()
            if row is None or remaining >= row.capacity + row.refill_per_second * left:
                return
            now = max(now, row.updated_at)
            refilled = min(row.capacity, row.tokens + (now - row.updated_at).total_seconds() * row.refill_per_second)
            to_minute_end = row.refill_per_second * left
            row.tokens = max(-to_minute_end, min(refilled, remaining - to_minute_end))
            row.updated_at = now
            if remaining <= 0:
                row.blocked_until = max(row.blocked_until or next_minute, next_minute)
            row.save(update_fields=["tokens", "updated_at", "blocked_until"])

    def block(self, exchange_id: str, seconds: float) -> None:
        """The exchange answered 429/418 with Retry-After: every worker pauses for `seconds`."""
        self.ensure(exchange_id)
        Rejection.objects.record(exchange_id, seconds)
        if self._postgres():
            self._fetch(_BLOCK_SQL, {"exchange_id": exchange_id, "seconds": float(seconds)})
            return
        with transaction.atomic(using=self.db):
            row = self._locked(exchange_id)
            now = timezone.now()
            until = now + timedelta(seconds=seconds)
            row.blocked_until = max(row.blocked_until or until, until)
            row.tokens, row.updated_at = 0.0, max(row.updated_at, now)
            row.save(update_fields=["blocked_until", "tokens", "updated_at"])

    def record_failure(self, exchange_id: str, threshold: int = 5, cooldown: float = 60) -> bool:
        """Count a transient failure against the exchange; True when this failure opened the circuit."""
        self.ensure(exchange_id)
        if self._postgres():
            params = {"exchange_id": exchange_id, "threshold": threshold, "cooldown": float(cooldown)}
            result = self._fetch(_FAILURE_SQL, params)
            return bool(result and result[0])
        with transaction.atomic(using=self.db):
            row = self._locked(exchange_id)
            now = timezone.now()
            row.circuit_failures += 1
            if row.circuit_open_until is None:
                opened = row.circuit_failures >= threshold
            else:
                opened = row.circuit_open_until <= now
            if opened:
                row.circuit_open_until = now + timedelta(seconds=cooldown)
                row.circuit_successes, row.circuit_trial_until = 0, None
            row.save(
                update_fields=["circuit_failures", "circuit_open_until", "circuit_successes", "circuit_trial_until"]
            )
            return opened

    def claim_trial(self, exchange_id: str, lease_seconds: float) -> bool:
        """Half-open: let exactly one request through, across every worker; True for the caller that gets it.

        One conditional UPDATE, so two workers can never both win. The trial is leased: a worker that
        dies holding it frees it after `lease_seconds`, and another worker may try.
        """
        now = Now()
        won = (
            self.filter(exchange_id=exchange_id, circuit_open_until__lte=now)
            .filter(Q(circuit_trial_until__isnull=True) | Q(circuit_trial_until__lte=now))
            .update(circuit_trial_until=now + timedelta(seconds=lease_seconds))
        )
        return bool(won)

    def record_success(self, exchange_id: str, trial: bool = False, successes_to_close: int = 3) -> None:
        """A request succeeded. A trial success counts towards closing the half-open circuit (closed after
        `successes_to_close` in a row) and lets the next trial through; any other success resets the count
        of consecutive failures of a closed circuit."""
        if not trial:
            self.filter(exchange_id=exchange_id, circuit_open_until__isnull=True).exclude(circuit_failures=0).update(
                circuit_failures=0
            )
            return
        closes = Q(circuit_successes__gte=successes_to_close - 1)
        self.filter(exchange_id=exchange_id, circuit_open_until__isnull=False).update(
            circuit_failures=Case(
                When(closes, then=Value(0)), default=F("circuit_failures"), output_field=models.PositiveIntegerField()
            ),
            circuit_open_until=Case(
                When(closes, then=Value(None)), default=F("circuit_open_until"), output_field=models.DateTimeField()
            ),
            circuit_successes=Case(
                When(closes, then=Value(0)),
                default=F("circuit_successes") + 1,
                output_field=models.PositiveIntegerField(),
            ),
            circuit_trial_until=None,
        )


class RateLimit(models.Model):
    """The token bucket one exchange's requests share, across every process on every machine."""

    exchange_id = models.CharField(max_length=64, unique=True)
    capacity = models.FloatField(help_text="Bucket size: the largest burst of weight.")
    refill_per_second = models.FloatField(help_text="Weight added back per second (weight per minute / 60).")
    tokens = models.FloatField(help_text="Weight available at updated_at.")
    updated_at = models.DateTimeField(default=timezone.now)
    blocked_until = models.DateTimeField(
        null=True, blank=True, help_text="The exchange asked us to back off (429/418 Retry-After) until then."
    )
    circuit_failures = models.PositiveIntegerField(
        default=0, help_text="Consecutive transient failures across all workers."
    )
    circuit_open_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Circuit breaker open: no requests until then; past it, half-open (one trial at a time).",
    )
    circuit_successes = models.PositiveIntegerField(
        default=0, help_text="Trial requests in a row that succeeded while the circuit is half-open."
    )
    circuit_trial_until = models.DateTimeField(
        null=True, blank=True, help_text="Half-open: the one trial request in flight holds the circuit until then."
    )
    announced_weight_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="The request weight per minute the exchange announces (exchangeInfo)."
    )
    configured_capacity = models.FloatField(
        null=True, blank=True, help_text="Bucket size the connector asks for (capacity is it, capped)."
    )
    configured_refill_per_second = models.FloatField(
        null=True, blank=True, help_text="Refill the connector asks for (refill_per_second is it, capped)."
    )
    window_seconds = models.FloatField(
        null=True,
        blank=True,
        help_text="The exchange counts weight per fixed window this long (Binance: a clock minute): up to "
        "capacity + refill x window per window, at once if need be. Empty: a token bucket refilling evenly.",
    )
    window_started_at = models.DateTimeField(null=True, blank=True, help_text="Start of the window window_used counts.")
    window_used = models.FloatField(
        default=0.0, help_text="Weight spent in that window: ours, or the exchange's count when higher."
    )
    granted = models.BigIntegerField(default=0)
    denied = models.BigIntegerField(default=0)
    tokens_used = models.FloatField(default=0.0)
    wait_seconds = models.FloatField(default=0.0, help_text="Total seconds callers waited for tokens.")

    objects = RateLimitQuerySet.as_manager()

    class Meta:
        ordering = ["exchange_id"]

    def __str__(self) -> str:
        return self.exchange_id

    @property
    def limit(self) -> float:
        """The most one request may weigh, and in window mode the most one window may spend."""
        if self.window_seconds is None:
            return self.capacity
        return self.capacity + self.refill_per_second * self.window_seconds

    def window_at(self, now: datetime) -> tuple[datetime, float]:
        """(start, weight used) of the fixed window `now` falls in; `_WINDOW_START` in Python."""
        assert self.window_seconds is not None
        epoch = now.timestamp()
        start = datetime.fromtimestamp(epoch - epoch % self.window_seconds, tz=now.tzinfo)
        if self.window_started_at is not None and self.window_started_at >= start:
            return self.window_started_at, self.window_used
        return start, 0.0

    @property
    def configured_weight_per_minute(self) -> float:
        """The weight per minute the connector asks for, before any cap."""
        refill = self.configured_refill_per_second
        return (refill if refill is not None else self.refill_per_second) * 60.0

    @property
    def effective_weight_per_minute(self) -> float:
        return self.refill_per_second * 60.0

    @property
    def capped(self) -> bool:
        """The exchange announces less than the connector asks for: the bucket is smaller than configured."""
        configured = self.configured_capacity if self.configured_capacity is not None else self.capacity
        return self.effective_weight_per_minute < self.configured_weight_per_minute or self.capacity < configured


class RejectionQuerySet(models.QuerySet):
    def record(self, exchange_id: str, retry_after: float) -> None:
        """Count one 429/418 answer; rows older than REJECTIONS_KEPT go at the same time (they are rare)."""
        now = timezone.now()
        self.create(exchange_id=exchange_id, at=now, retry_after=retry_after)
        self.filter(exchange_id=exchange_id, at__lt=now - REJECTIONS_KEPT).delete()

    def since(self, moment: datetime) -> "RejectionQuerySet":
        return self.filter(at__gte=moment)


# Rejections are counted over the last hour and day (the status and stats APIs); older rows are deleted.
REJECTIONS_KEPT = timedelta(days=2)


class Rejection(models.Model):
    """One rate-limit answer (HTTP 429 or 418) from an exchange: the shared limiter should make them rare,
    so each is a row, and "how many in the last hour" is a count."""

    exchange_id = models.CharField(max_length=64)
    at = models.DateTimeField(default=timezone.now)
    retry_after = models.FloatField(help_text="Seconds every worker paused for (the answer's Retry-After).")

    objects = RejectionQuerySet.as_manager()

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["exchange_id", "at"], name="rejection_exchange_at_idx")]

    def __str__(self) -> str:
        return f"{self.exchange_id} rate limited at {self.at:%Y-%m-%d %H:%M:%S}"


@receiver(post_save, sender="connectors.Connector", dispatch_uid="ratelimits.sync_connector")
def _sync_connector_limit(sender: type, instance: models.Model, raw: bool = False, using: str = "default", **kwargs):
    """Keep the shared bucket's size and refill in step with the connector the operator edits."""
    if raw:  # loaddata: the fixture carries its own rate limit rows
        return
    # Connector.save() has filled blank limits from collector.yaml already.
    capacity, refill = float(instance.rate_limit_burst), instance.rate_limit_weight_per_minute / 60.0
    RateLimit.objects.db_manager(router.db_for_write(RateLimit)).configure(instance.exchange_id, capacity, refill)


def acquire_token(exchange_id: str, weight: float) -> float:
    return RateLimit.objects.acquire_token(exchange_id, weight)


def acquire(exchange_id: str, weight: float, timeout: float = 60.0) -> float:
    return RateLimit.objects.acquire(exchange_id, weight, timeout=timeout)
