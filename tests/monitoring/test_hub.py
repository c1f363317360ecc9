"""The WebSocket hub at /ws with a real uvicorn server process, real Redis (and, without it, the embedded
outbox layer), real `run_scheduler` processes on the simulated exchange and a real WebSocket client."""

import asyncio
import collections
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import websockets
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone
from rest_framework.authtoken.models import Token
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from apps.connectors.models import Connector
from apps.jobs.models import Job
from apps.marketdata import store
from apps.monitoring.hub import MAX_QUEUED_MESSAGES, MAX_SUBSCRIPTIONS, TOO_SLOW_CLOSE_CODE
from tests.conftest import grant
from tests.jobs.conftest import track
from tests.jobs.standins import child_env

REDIS_URL = "redis://127.0.0.1:6379/0"
TIMEOUT = 60.0


def redis_answers() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
needs_redis = pytest.mark.skipif(not redis_answers(), reason="no Redis at 127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(tmp_path: Path, **env: str) -> str:
    """uvicorn serving the project's ASGI application; returns its ws:// URL once /health answers."""
    port = free_port()
    log = (tmp_path / f"uvicorn-{port}.log").open("w")
    process = track(
        subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "datacollector.asgi:application", "--host", "127.0.0.1",
             "--port", str(port), "--ws", "websockets-sansio", "--log-level", "warning"],
            cwd=settings.BASE_DIR, env=child_env(**env), stdout=log, stderr=subprocess.STDOUT,
        )
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return f"ws://127.0.0.1:{port}/ws"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (tmp_path / f"uvicorn-{port}.log").read_text()
                raise AssertionError(f"uvicorn did not start: {log_text}") from None
            time.sleep(0.1)


def run_scheduler_once(tmp_path: Path, **env: str) -> None:
    log = tmp_path / "scheduler.log"
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, "manage.py", "run_scheduler", "--once", "--workers", "1"],
            cwd=settings.BASE_DIR, env=child_env(**env), stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT,
        ).returncode  # fmt: skip
    assert code == 0, log.read_text()


@pytest.fixture
def token() -> str:
    user = grant(get_user_model().objects.create_user("operator", password="operator-password-1"))
    return Token.objects.create(user=user).key


@pytest.fixture
def job() -> Job:
    connector = Connector.objects.create(exchange_id="simulated")
    # A few candles behind: one run stores them.
    cursor = (int(time.time() * 1000) // 60_000 - 5) * 60_000
    return Job.objects.create(
        connector=connector, symbol="BTC/USDT", timeframe="1m", cursor=cursor, next_run_at=timezone.now()
    )


async def receive(ws, kind: str, timeout: float = TIMEOUT) -> dict:
    """The next message of type `kind`, skipping others."""
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
        if message["type"] == kind:
            return message


async def send(ws, **message) -> dict:
    await ws.send(json.dumps(message))
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


OHLCV = {"channel": "ohlcv", "exchange": "simulated", "symbol": "BTC/USDT", "timeframe": "1m"}


@needs_redis
def test_candle_committed_by_run_scheduler_arrives_then_unsubscribe_stops_it(tmp_path, token, job) -> None:
    url = start_server(tmp_path, REDIS_URL=REDIS_URL)

    def run_again() -> None:
        store.delete_series("simulated", "BTC/USDT", "1m")
        Job.objects.filter(pk=job.pk).update(cursor=job.cursor, next_run_at=timezone.now())
        run_scheduler_once(tmp_path, REDIS_URL=REDIS_URL)

    async def scenario() -> tuple[dict, dict, list[dict], dict]:
        headers = {"Authorization": f"Token {token}"}
        async with websockets.connect(url, additional_headers=headers) as ws:
            assert await send(ws, action="subscribe", **OHLCV) == {"type": "subscribed", **OHLCV}
            assert await send(ws, action="subscribe", channel="jobs") == {"type": "subscribed", "channel": "jobs"}
            await asyncio.to_thread(run_scheduler_once, tmp_path, REDIS_URL=REDIS_URL)
            started = await receive(ws, "job")
            finished = await receive(ws, "job")
            candles = [await receive(ws, "ohlcv") for _ in range(finished["run"]["candles_written"])]

            assert await send(ws, action="unsubscribe", **OHLCV) == {"type": "unsubscribed", **OHLCV}
            assert await send(ws, action="unsubscribe", **OHLCV) == {
                "type": "error",
                "error": f"not subscribed to {json.dumps(OHLCV)}",
                "field": "channel",
            }
            # The next run stores the candles again and publishes them, but not to this connection.
            await asyncio.to_thread(run_again)
            again = await receive(ws, "job")
            again = again if again["event"] == "finished" else await receive(ws, "job")
            assert await send(ws, action="ping") == {"type": "pong"}  # nothing (no ohlcv) came before the pong
            return started, finished, candles, again

    started, finished, candles, again = asyncio.run(scenario())

    assert (started["event"], started["job"]["id"], started["run"]["status"]) == ("started", job.pk, "running")
    assert (finished["event"], finished["run"]["status"]) == ("finished", "success")
    last = store.last_ts("simulated", "BTC/USDT", "1m")
    assert candles[-1]["candle"]["ts"] == last == finished["job"]["cursor"]
    stored = store.read_candles("simulated", "BTC/USDT", "1m", start_ts=last, end_ts=last)[0]
    assert [candles[-1]["candle"][k] for k in ("ts", "open", "high", "low", "close", "volume")] == stored
    assert "sma_20" in candles[-1]["indicators"]  # with its indicator values (blank: warm-up)
    assert again["run"]["candles_written"] > 0


@needs_redis
def test_bad_messages_get_an_error_naming_what_is_wrong_and_the_connection_stays_open(tmp_path, token) -> None:
    url = start_server(tmp_path, REDIS_URL=REDIS_URL)
    cases = [
        ("not json", None, "not JSON"),
        ("[1, 2]", None, "a message is a JSON object"),
        ('{"action": "shout"}', "action", "unknown action 'shout'; actions: subscribe, unsubscribe, ping"),
        ('{"action": "subscribe", "channel": "trades"}', "channel", "unknown channel 'trades'"),
        ('{"action": "subscribe", "channel": "ohlcv", "exchange": "binance", "timeframe": "1m"}', "symbol",
         "symbol is required for channel ohlcv"),
        ('{"action": "subscribe", "channel": "ohlcv", "exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1x"}',
         "timeframe", "Timeframe '1x' is not well formed"),
        ('{"action": "subscribe", "channel": "jobs", "connector": "three"}', "connector", "connector must be"),
        ('{"action": "subscribe", "channel": "jobs", "colour": "red"}', "colour", "unknown field 'colour'"),
        ("x" * 5000, None, "message longer than 4096 characters"),
    ]  # fmt: skip

    async def scenario() -> None:
        async with websockets.connect(f"{url}?token={token}") as ws:
            for text, field, error in cases:
                await ws.send(text)
                answer = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                assert answer["type"] == "error", text
                assert answer["error"].startswith(error), (text, answer)
                assert answer.get("field") == field, (text, answer)
            await ws.send(b"\x00binary")
            assert (await receive(ws, "error"))["error"].startswith("send text frames")
            for n in range(MAX_SUBSCRIPTIONS):
                assert (await send(ws, action="subscribe", channel="jobs", connector=n + 1))["type"] == "subscribed"
            capped = await send(ws, action="subscribe", channel="gaps")
            assert capped["error"] == f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection; unsubscribe first"
            assert await send(ws, action="ping") == {"type": "pong"}

    asyncio.run(scenario())


@needs_redis
def test_unauthenticated_and_unauthorised_connections_are_refused(tmp_path, token) -> None:
    url = start_server(tmp_path, REDIS_URL=REDIS_URL)
    reader = get_user_model().objects.create_user("reader", password="reader-password-1")
    reader_token = Token.objects.create(user=grant(reader, "view_job")).key

    async def scenario() -> None:
        # Anonymous, a wrong token in the query, a wrong token in the header (no cookie fallback).
        for attempt, headers in ((url, None), (f"{url}?token=wrong", None), (url, {"Authorization": "Token wrong"})):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(attempt, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 403
        async with websockets.connect(f"{url}?token={reader_token}") as ws:
            assert (await send(ws, action="subscribe", channel="jobs"))["type"] == "subscribed"
            denied = await send(ws, action="subscribe", **OHLCV)
            assert denied == {
                "type": "error",
                "error": "permission denied: channel ohlcv needs marketdata.view_candle",
                "field": "channel",
            }

    asyncio.run(scenario())


@pytest.fixture
def no_redis(monkeypatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)


def test_embedded_layer_carries_a_candle_from_the_scheduler_process_to_the_web_process(
    tmp_path, token, job, no_redis
) -> None:
    # No REDIS_URL in either process: the scheduler writes the outbox, the web process relays it.
    url = start_server(tmp_path)

    async def scenario() -> None:
        async with websockets.connect(f"{url}?token={token}") as ws:
            assert (await send(ws, action="subscribe", **OHLCV))["type"] == "subscribed"
            # In two of the job messages' groups: each message still arrives once.
            assert (await send(ws, action="subscribe", channel="jobs"))["type"] == "subscribed"
            assert (await send(ws, action="subscribe", channel="jobs", connector=job.connector_id))["type"] == (
                "subscribed"
            )
            await asyncio.to_thread(run_scheduler_once, tmp_path)
            messages = []
            with contextlib.suppress(TimeoutError):
                while True:
                    messages.append(json.loads(await asyncio.wait_for(ws.recv(), 3)))
            candles = [message for message in messages if message["type"] == "ohlcv"]
            assert candles
            assert candles[-1]["candle"]["ts"] > job.cursor
            assert candles[-1]["symbol"] == "BTC/USDT"
            finished = [message for message in messages if message["type"] == "job" and message["event"] == "finished"]
            assert len(finished) == 1

    asyncio.run(scenario())


@needs_redis
def test_a_logged_in_browser_connects_with_its_session_from_this_site_only(tmp_path) -> None:
    # The server signs nothing the test did not: the session's auth hash needs the same SECRET_KEY.
    url = start_server(tmp_path, REDIS_URL=REDIS_URL, SECRET_KEY=settings.SECRET_KEY)
    grant(get_user_model().objects.create_user("browser", password="browser-password-1"))
    browser = Client()
    assert browser.login(username="browser", password="browser-password-1")
    cookie = f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}"
    origin = url.replace("ws://", "http://").removesuffix("/ws")

    async def scenario() -> None:
        async with websockets.connect(url, additional_headers={"Cookie": cookie}, origin=origin) as ws:
            assert await send(ws, action="subscribe", channel="jobs") == {"type": "subscribed", "channel": "jobs"}
        # The same cookie sent along by another site's page (or with no Origin) is not a login.
        for other in ("http://evil.example", None):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url, additional_headers={"Cookie": cookie}, origin=other):
                    pass
            assert refused.value.response.status_code == 403

    asyncio.run(scenario())


def publish_jobs_messages(count: int, padding: int) -> None:
    """A separate process publishes `count` messages of some `padding` characters to the `jobs` group."""
    message = f"{{'type': 'job', 'event': 'test', 'n': n, 'pad': 'x' * {padding}}}"
    code = (
        "import django; django.setup(); from apps.monitoring import live\n"
        f"for n in range({count}):\n"
        f"    live.publisher.publish([live.jobs_group()], {message})\n"
        "live.publisher.flush(timeout=60)\n"
    )
    env = child_env(REDIS_URL=REDIS_URL, DJANGO_SETTINGS_MODULE="datacollector.settings")
    subprocess.run([sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env, check=True, timeout=TIMEOUT)


class StalledClient:
    """A WebSocket client on a blocking socket with a small receive buffer, which reads only when asked:
    once subscribed, it stops reading like a browser tab that hangs."""

    def __init__(self, url: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url))
        self.events: collections.deque = collections.deque()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)  # no autotuning to megabytes
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(("127.0.0.1", urlsplit(url).port))
        self.protocol.send_request(self.protocol.connect())
        self.flush()
        self.texts: list[dict] = []
        self.close_code: int | None = None
        assert isinstance(self.next_event(), Response)

    def flush(self) -> None:
        self.sock.sendall(b"".join(self.protocol.data_to_send()))

    def next_event(self) -> Any:
        while not self.events:
            data = self.sock.recv(65536)
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            self.flush()
            self.events.extend(self.protocol.events_received())
        return self.events.popleft()

    def send(self, **message: Any) -> dict:
        self.protocol.send_text(json.dumps(message).encode())
        self.flush()
        return json.loads(self.next_event().data)

    def read_to_the_end(self) -> None:
        """Every message still on its way, up to the server's close."""
        while self.close_code is None:
            frame = self.next_event()
            if frame.opcode is Opcode.TEXT:
                self.texts.append(json.loads(frame.data))
            elif frame.opcode is Opcode.CLOSE:
                self.close_code = self.protocol.close_rcvd.code
        self.sock.close()


@needs_redis
def test_a_client_that_stops_reading_is_closed_and_holds_up_no_one(tmp_path, token) -> None:
    url = start_server(tmp_path, REDIS_URL=REDIS_URL)
    stalled = StalledClient(f"{url}?token={token}")
    assert stalled.send(action="subscribe", channel="jobs")["type"] == "subscribed"
    # Messages of 8 kB: more than the server's socket buffer (4 MB at most) holds, and then more than
    # MAX_QUEUED_MESSAGES queued for the client that reads nothing.
    count = MAX_QUEUED_MESSAGES * 3

    async def read_all() -> list[int]:
        async with websockets.connect(f"{url}?token={token}", max_size=None) as reader:
            assert (await send(reader, action="subscribe", channel="jobs"))["type"] == "subscribed"
            publishing = asyncio.create_task(asyncio.to_thread(publish_jobs_messages, count, 8000))
            received = [(await receive(reader, "job"))["n"] for _ in range(count)]
            await publishing
            return received

    received = asyncio.run(read_all())
    stalled.read_to_the_end()

    assert received == list(range(count))  # every message, in order, while the other client read nothing
    assert 0 < len(stalled.texts) < count
    assert stalled.close_code == TOO_SLOW_CLOSE_CODE
