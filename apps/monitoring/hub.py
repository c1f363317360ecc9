"""The WebSocket hub at `/ws` (ARCH-001 4.1.2): clients subscribe to the channels they care about and
the processes that commit data push to them (`apps.monitoring.live`).

Client messages (JSON text frames):

    {"action": "subscribe", "channel": "ohlcv", "exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m"}
    {"action": "subscribe", "channel": "jobs"}                  every job; "connector": 3 for one connector's
    {"action": "subscribe", "channel": "ratelimits"}            every exchange; "exchange": "binance" for one
    {"action": "subscribe", "channel": "gaps"}                  every exchange; "exchange": "binance" for one
    {"action": "unsubscribe", ...the same fields...}
    {"action": "ping"}

Answers: `subscribed` / `unsubscribed` (the subscription echoed), `pong`, and `error` with `error` (what
was wrong) and `field` (which field, when one); a bad message never closes the connection. Pushed:
`ohlcv` (a closed candle and its indicator values), `job` (event `started` / `finished`, with the run;
`status`: paused, resumed or made due by an operator, no run), `backfill` (progress), `ratelimit`
(bucket, back-off, circuit), `gaps` (a series' open gaps).

Who may connect: the same users as the API, by the session cookie (from a page of this site: the Origin
must be an allowed host, so another site cannot ride a logged-in browser), or by a token in the
`Authorization: Token <key>` header or the `token` query parameter (browsers cannot set headers on a
WebSocket). Anonymous connections are refused at the handshake (403). Each channel needs the model
permission that reads the same data in the API (`CHANNEL_PERMISSIONS`).

Fan-out (`Fanout`): a web process holds ONE subscription per group to the channel layer, however many of
its sockets subscribed, and hands each message to them itself, as the text the publisher serialised once.
A push is written to the socket at once; only a socket whose client does not keep up gets a queue and a
task (`HubConsumer.push`; at most MAX_QUEUED_MESSAGES queued, then it is disconnected: it can neither
hold up the others nor grow the process). The consumers have no
channel of their own: Channels' per-consumer dispatch costs two thread-pool hops per message (it closes
stale database connections around each one), which at 1,000 sockets was most of a message's latency.
"""

import asyncio
import collections
import json
import logging
import time
from collections.abc import Coroutine
from datetime import timedelta
from importlib import import_module
from typing import Any
from urllib.parse import parse_qs, urlsplit

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.middleware import BaseMiddleware
from channels.routing import URLRouter
from django.conf import settings
from django.contrib import auth
from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest
from django.http.cookie import parse_cookie
from django.http.request import split_domain_port, validate_host
from django.urls import re_path
from django.utils import timezone
from rest_framework.authtoken.models import Token

from apps.marketdata.timeframes import is_valid_timeframe, timeframe_error
from apps.monitoring import live
from apps.monitoring.models import LiveEvent

logger = logging.getLogger(__name__)

MAX_SUBSCRIPTIONS = 100
MAX_MESSAGE_CHARS = 4096
# Pushed messages waiting for one socket (its client reads slower than they come): beyond this it is closed.
MAX_QUEUED_MESSAGES = 1000
TOO_SLOW_CLOSE_CODE = 1013  # "try again later"
CHANNEL_PERMISSIONS = {
    "ohlcv": "marketdata.view_candle",
    "jobs": "jobs.view_job",
    "ratelimits": "ratelimits.view_ratelimit",
    "gaps": "marketdata.view_gap",
}
# Fields each channel's subscription takes: (required, optional).
CHANNEL_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ohlcv": (("exchange", "symbol", "timeframe"), ()),
    "jobs": ((), ("connector",)),
    "ratelimits": ((), ("exchange",)),
    "gaps": ((), ("exchange",)),
}
ACTIONS = ("subscribe", "unsubscribe", "ping")


class BadMessage(Exception):
    def __init__(self, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.field = field


def group_for(channel: str, fields: dict[str, Any]) -> str:
    if channel == "ohlcv":
        return live.series_group(fields["exchange"], fields["symbol"], fields["timeframe"])
    if channel == "jobs":
        return live.jobs_group(fields.get("connector"))
    if channel == "ratelimits":
        return live.ratelimits_group(fields.get("exchange"))
    return live.gaps_group(fields.get("exchange"))


def parse_subscription(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(channel, its fields) of a subscribe/unsubscribe message, or BadMessage naming the field."""
    channel = message.get("channel")
    if channel not in CHANNEL_FIELDS:
        raise BadMessage(f"unknown channel {channel!r}; channels: {', '.join(CHANNEL_FIELDS)}", "channel")
    required, optional = CHANNEL_FIELDS[channel]
    unknown = sorted(set(message) - {"action", "channel", *required, *optional})
    if unknown:
        accepted = ", ".join((*required, *optional)) or "none"
        raise BadMessage(f"unknown field {unknown[0]!r} for channel {channel}; its fields: {accepted}", unknown[0])
    fields: dict[str, Any] = {}
    for name in (*required, *optional):
        value = message.get(name)
        if value is None:
            if name in required:
                raise BadMessage(f"{name} is required for channel {channel}", name)
            continue
        if name == "connector":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
                raise BadMessage(f"connector must be a connector id (a positive integer), got {value!r}", name)
        elif not isinstance(value, str) or not value.strip() or len(value) > 64 or "\0" in value:
            raise BadMessage(f"{name} must be a non-empty string of at most 64 characters, got {value!r}", name)
        elif name == "timeframe" and not is_valid_timeframe(value):
            raise BadMessage(timeframe_error(value), name)
        fields[name] = value
    return channel, fields


class HubConsumer(AsyncWebsocketConsumer):
    """One WebSocket client: its subscriptions are groups of this process's `Fanout`."""

    # No channel-layer channel per socket: the process's Fanout pushes to it (`push`).
    channel_layer_alias = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active:
            await self.close()  # before accept: the handshake is refused with 403
            return
        self.subscriptions: dict[tuple, str] = {}
        self.recent: collections.deque[str] = collections.deque(maxlen=32)
        self.outgoing: collections.deque[str] = collections.deque()
        self.sender: asyncio.Task | None = None
        self.too_slow = False
        self.fanout = Fanout.current()
        self.permissions = await database_sync_to_async(
            lambda: {c: user.has_perm(p) for c, p in CHANNEL_PERMISSIONS.items()}
        )()
        await self.accept()
        if settings.LIVE_OUTBOX:
            OutboxRelay.ensure_running(self.fanout)

    async def disconnect(self, code: int) -> None:
        if not hasattr(self, "fanout"):
            return  # refused at the handshake
        for group in set(self.subscriptions.values()):
            await self.fanout.discard(group, self)
        self.subscriptions.clear()
        self.outgoing.clear()
        if self.sender is not None:
            self.sender.cancel()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            message = self.decode(text_data)
            action = message["action"]
            if action == "ping":
                await self.reply({"type": "pong"})
                return
            channel, fields = parse_subscription(message)
            key = (channel, *sorted(fields.items()))
            if action == "subscribe":
                await self.subscribe(key, channel, fields)
            else:
                await self.unsubscribe(key, channel, fields)
        except BadMessage as bad:
            answer = {"type": "error", "error": bad.error}
            if bad.field:
                answer["field"] = bad.field
            await self.reply(answer)

    def decode(self, text_data: str | None) -> dict[str, Any]:
        if text_data is None:
            raise BadMessage("send text frames holding JSON objects, not binary frames")
        if len(text_data) > MAX_MESSAGE_CHARS:
            raise BadMessage(f"message longer than {MAX_MESSAGE_CHARS} characters")
        try:
            message = json.loads(text_data)
        except ValueError as exc:
            raise BadMessage(f"not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise BadMessage('a message is a JSON object, e.g. {"action": "ping"}')
        if message.get("action") not in ACTIONS:
            raise BadMessage(f"unknown action {message.get('action')!r}; actions: {', '.join(ACTIONS)}", "action")
        return message

    async def subscribe(self, key: tuple, channel: str, fields: dict[str, Any]) -> None:
        if not self.permissions[channel]:
            raise BadMessage(f"permission denied: channel {channel} needs {CHANNEL_PERMISSIONS[channel]}", "channel")
        if key not in self.subscriptions:
            if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
                raise BadMessage(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection; unsubscribe first")
            group = group_for(channel, fields)
            self.subscriptions[key] = group
            await self.fanout.add(group, self)
        await self.reply({"type": "subscribed", "channel": channel, **fields})

    async def unsubscribe(self, key: tuple, channel: str, fields: dict[str, Any]) -> None:
        group = self.subscriptions.pop(key, None)
        if group is None:
            raise BadMessage(f"not subscribed to {json.dumps({'channel': channel, **fields})}", "channel")
        if group not in self.subscriptions.values():
            await self.fanout.discard(group, self)
        await self.reply({"type": "unsubscribed", "channel": channel, **fields})

    async def reply(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload))

    def push(self, text: str, message_id: str | None) -> None:
        """Send a group's message (serialised once by the publisher) to this socket without waiting: at
        once when the connection takes it (the usual case), else behind the send that waits for the client
        to read (`send_outgoing`)."""
        # A client subscribed to both `jobs` and `jobs` of one connector gets a job's message once.
        if message_id is not None:
            if message_id in self.recent:
                return
            self.recent.append(message_id)
        if self.too_slow:
            return
        if self.sender is not None:
            if len(self.outgoing) >= MAX_QUEUED_MESSAGES:
                self.too_slow = True
                asyncio.get_running_loop().create_task(self.close_too_slow())
            else:
                self.outgoing.append(text)
            return
        send = self.base_send({"type": "websocket.send", "text": text})
        try:
            awaited = start(send)
        except Exception:
            return  # the client went away; disconnect() cleans up
        if awaited is not DONE:
            self.sender = asyncio.get_running_loop().create_task(self.send_outgoing(send, awaited))

    async def send_outgoing(self, send: Coroutine, awaited: Any) -> None:
        # A socket whose client reads slower than messages come (uvicorn holds a send while the
        # connection's write buffer is full) gets this task; the fan-out goes on to the other sockets.
        try:
            await finish(send, awaited)
            while self.outgoing:
                await self.base_send({"type": "websocket.send", "text": self.outgoing.popleft()})
        except Exception:  # the client went away; disconnect() cleans up
            self.outgoing.clear()
        finally:
            self.sender = None

    async def close_too_slow(self) -> None:
        logger.warning("live hub: closing a client that left %d messages unread", len(self.outgoing))
        self.outgoing.clear()
        for group in set(self.subscriptions.values()):
            await self.fanout.discard(group, self)
        self.subscriptions.clear()
        await self.close(code=TOO_SLOW_CLOSE_CODE, reason=f"too slow: {MAX_QUEUED_MESSAGES} messages unread")


DONE = object()


def start(coroutine: Coroutine) -> Any:
    """Run `coroutine` in the calling task up to its first wait: DONE when it finished, else what it
    waits for (hand both to `finish`). The eager start of Python 3.12's eager tasks, for 3.11: a push to
    1,000 sockets costs no task per socket when none of them has to wait."""
    try:
        return coroutine.send(None)
    except StopIteration:
        return DONE


async def finish(coroutine: Coroutine, awaited: Any) -> None:
    """Run a coroutine that `start` left waiting for `awaited` (a future, or None: a bare yield) to its end."""
    try:
        while True:
            if awaited is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait([awaited])  # its outcome, even an exception, is the coroutine's to see
            awaited = coroutine.send(None)
    except StopIteration:
        pass
    except asyncio.CancelledError:
        coroutine.close()  # runs its `finally` blocks (the waiter it registered is removed)
        raise


class Fanout:
    """This process's live subscriptions: the sockets in each group, and one channel-layer subscription
    per group that has any (Redis pub/sub; none in the embedded mode, where `OutboxRelay` delivers).

    One per event loop (`current`). Publishers send {"group", "id", "text"} (`live.Publisher`); `deliver`
    pushes the text to every socket of the group, without waiting for any of them.
    """

    _instances: dict[asyncio.AbstractEventLoop, "Fanout"] = {}

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.members: dict[str, set[HubConsumer]] = {}
        self.channel: str | None = None
        self.reader: asyncio.Task | None = None
        self.failing = False

    @classmethod
    def current(cls) -> "Fanout":
        loop = asyncio.get_running_loop()
        if loop not in cls._instances:
            cls._instances[loop] = cls(None if settings.LIVE_OUTBOX else get_channel_layer())
        return cls._instances[loop]

    async def add(self, group: str, consumer: HubConsumer) -> None:
        members = self.members.get(group)
        if members is None:
            members = self.members[group] = set()
            if self.layer is not None:
                if self.channel is None:
                    channel = await self.layer.new_channel("live-fanout.")
                    if self.channel is None:  # not made by another socket's add meanwhile
                        self.channel = channel
                        self.reader = asyncio.get_running_loop().create_task(self.read(), name="live-fanout")
                await self.layer.group_add(group, self.channel)
        members.add(consumer)

    async def discard(self, group: str, consumer: HubConsumer) -> None:
        if self.forget(group, consumer) and self.layer is not None:
            await self.layer.group_discard(group, self.channel)

    def forget(self, group: str, consumer: HubConsumer) -> bool:
        """Take `consumer` out of `group`; True when the group has no socket left (unsubscribe it)."""
        members = self.members.get(group)
        if members is None:
            return False
        members.discard(consumer)
        if members:
            return False
        del self.members[group]
        return True

    def deliver(self, group: str, text: str, message_id: str | None = None) -> None:
        for consumer in list(self.members.get(group, ())):
            consumer.push(text, message_id)

    async def read(self) -> None:
        """The channel layer's messages for this process's groups, to their sockets."""
        while True:
            try:
                message = await self.layer.receive(self.channel)
                self.deliver(message["group"], message["text"], message.get("id"))
                if self.failing:
                    self.failing = False
                    logger.info("live hub: the channel layer answers again")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self.failing:
                    self.failing = True
                    logger.warning("live hub cannot read the channel layer: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(1.0)


class HubAuthMiddleware(BaseMiddleware):
    """Puts the connecting user in scope["user"]: a token's (header or query) or the session's.

    A token, when given, decides alone (a wrong one is refused, not replaced by the cookie). A session's
    user counts only when the browser's Origin is one of ALLOWED_HOSTS: cookies go with cross-site
    WebSockets too. The session is read here rather than by Channels' session middleware, which would
    wrap every send of the connection (each push) to save a session a WebSocket never changes.
    """

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        scope = dict(scope)
        key = token_from(scope)
        if key is not None:
            scope["user"] = await user_for_token(key)
        elif origin_allowed(scope):
            scope["user"] = await user_for_session(scope)
        else:
            scope["user"] = AnonymousUser()
        return await super().__call__(scope, receive, send)


def token_from(scope: dict) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            if scheme.lower() == "token" and key.strip():
                return key.strip()
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


@database_sync_to_async
def user_for_token(key: str) -> Any:
    token = Token.objects.select_related("user").filter(key=key[:40]).first()
    if token is None or not token.user.is_active:
        return AnonymousUser()
    return token.user


@database_sync_to_async
def user_for_session(scope: dict) -> Any:
    """The user logged in with the session cookie of the handshake, as Django's auth middleware finds it."""
    cookies = parse_cookie(next((v.decode("latin-1") for n, v in scope.get("headers", []) if n == b"cookie"), ""))
    session_key = cookies.get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return AnonymousUser()
    request = HttpRequest()
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    return auth.get_user(request)


def origin_allowed(scope: dict) -> bool:
    origin = next((value for name, value in scope.get("headers", []) if name == b"origin"), None)
    if origin is None:
        return False
    host, _port = split_domain_port(urlsplit(origin.decode("latin-1")).netloc)
    allowed = settings.ALLOWED_HOSTS or (["localhost", "127.0.0.1", "[::1]"] if settings.DEBUG else [])
    return bool(host) and validate_host(host, allowed)


class OutboxRelay:
    """The embedded hub's relay (no REDIS_URL): new `LiveEvent` rows to this process's in-memory layer.

    One task per web process (per event loop), started by its first WebSocket client. It polls every
    POLL_SECONDS for rows after the newest one it has passed on. Rows commit in id order almost always;
    one whose INSERT committed a moment after a higher id's would be skipped, so rows of the last
    SETTLE_SECONDS are read again and those already passed on are recognised by id.
    """

    POLL_SECONDS = 0.2
    SETTLE_SECONDS = 2.0
    BATCH = 5000
    _running: dict[asyncio.AbstractEventLoop, "asyncio.Task"] = {}

    def __init__(self, fanout: Fanout) -> None:
        self.fanout = fanout
        self.settled_id = 0  # every row up to here has been passed on
        self.seen: set[int] = set()
        self.failing = False
        self.trimmed_at = 0.0

    @classmethod
    def ensure_running(cls, fanout: Fanout) -> None:
        loop = asyncio.get_running_loop()
        task = cls._running.get(loop)
        if task is None or task.done():
            cls._running[loop] = loop.create_task(cls(fanout).run(), name="live-outbox-relay")

    async def run(self) -> None:
        self.settled_id = (
            await database_sync_to_async(LiveEvent.objects.order_by("-id").values_list("id", flat=True).first)() or 0
        )
        while True:
            try:
                for row in await database_sync_to_async(self.fetch)():
                    text = json.dumps(row.payload)
                    for group in row.groups:
                        # One id for all of the message's groups: a client in two of them gets it once.
                        self.fanout.deliver(group, text, f"o{row.pk}")
                if self.failing:
                    self.failing = False
                    logger.info("live outbox relay: the database answers again")
            except Exception as exc:
                if not self.failing:
                    self.failing = True
                    logger.warning("live outbox relay cannot read the outbox: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.POLL_SECONDS)

    def fetch(self) -> list[LiveEvent]:
        rows = list(LiveEvent.objects.filter(pk__gt=self.settled_id).order_by("pk")[: self.BATCH])
        new = [row for row in rows if row.pk not in self.seen]
        self.seen.update(row.pk for row in new)
        settled_before = timezone.now() - timedelta(seconds=self.SETTLE_SECONDS)
        for row in rows:
            if row.created_at >= settled_before:
                break
            self.settled_id = row.pk
        self.seen = {pk for pk in self.seen if pk > self.settled_id}
        now = time.monotonic()
        if now - self.trimmed_at >= live.OUTBOX_TRIM_INTERVAL_SECONDS:
            self.trimmed_at = now
            LiveEvent.objects.trim(live.OUTBOX_KEEP_SECONDS)
        return new


websocket_urlpatterns = [re_path(r"^ws/?$", HubConsumer.as_asgi())]


def websocket_application() -> Any:
    """The `websocket` branch of the ASGI application: authentication, then the hub at /ws."""
    return HubAuthMiddleware(URLRouter(websocket_urlpatterns))
