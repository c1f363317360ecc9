"""A local HTTP server speaking the part of Binance's spot REST API that collection uses.

`/api/v3/exchangeInfo`, `/api/v3/klines`, `/api/v3/time` and `/api/v3/ping`, with Binance's semantics:
klines are the first `limit` candles (default 500, at most 1,000) opening at or after `startTime` and at
or before `endTime`; the forming candle is included; errors are `{"code": -1121, "msg": ...}` bodies.
Weight is counted per fixed clock minute like Binance (`X-MBX-USED-WEIGHT-1M` on every answer); past
the limit the answer is 429 with `Retry-After`, and a client that keeps asking before then gets 418.

The data is deterministic: candle values are a hash of (symbol, interval, open time), and the server's
clock (`now_ms`) is fixed unless told otherwise, so a test knows exactly which candles are closed. Holes
(candles the exchange itself lacks) and faults (5xx with HTML or Binance error bodies, connection resets,
timeouts, short and empty pages, truncated 200 bodies, latency) are configurable, each at its own rate;
faults are drawn from a seeded random generator. `exchangeInfo.rateLimits` announces the limits as
Binance does (REQUEST_WEIGHT, ORDERS, RAW_REQUESTS); the weight limit is enforced.

Used by tests/jobs/test_binance_integration.py and benchmarks/bench_backfill.py; binds 127.0.0.1:0.
"""

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

INTERVALS_MS = {
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
}

WEIGHTS = {"/api/v3/klines": 2, "/api/v3/exchangeInfo": 20, "/api/v3/time": 1, "/api/v3/ping": 1}


@dataclasses.dataclass
class Faults:
    """Shares (0..1) of klines requests that fail in each way; drawn from `seed`."""

    server_error: float = 0.0  # 500/502/503 with an HTML body
    # HTTP 5xx with a Binance error body ({"code": -1008, "msg": "Server is currently overloaded..."}),
    # the code drawn from `binance_codes`
    binance_error: float = 0.0
    reset: float = 0.0  # the connection is closed without an answer
    timeout: float = 0.0  # the answer comes after `timeout_seconds` (longer than the client waits)
    short_page: float = 0.0  # only the first part of the rows
    empty_page: float = 0.0  # []
    truncated: float = 0.0  # a 200 whose JSON body is cut off
    timeout_seconds: float = 1.0
    seed: int = 7
    binance_codes: tuple[int, ...] = (-1008, -1000, -1001, -1007)


# Binance's error bodies for trouble on its side, and the HTTP status each comes with.
BINANCE_ERRORS = {
    -1000: (500, "An unknown error occurred while processing the request."),
    -1001: (502, "Internal error; unable to process your request. Please try again."),
    -1007: (504, "Timeout waiting for response from backend server. Send status unknown; execution status unknown."),
    -1008: (503, "Server is currently overloaded with other requests. Please try again in a few minutes."),
}


def _unit(*parts: object) -> float:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return struct.unpack(">Q", digest)[0] / 2.0**64


def market_id(symbol: str) -> str:
    return symbol.replace("/", "")


class FakeBinance:
    """The server's state; `start()` serves it on 127.0.0.1 (a free port) from a daemon thread."""

    def __init__(
        self,
        symbols: dict[str, int],
        now_ms: int | None = None,
        weight_limit: int = 6000,
        latency_ms: float = 0.0,
        faults: Faults | None = None,
        holes: dict[tuple[str, str], list[tuple[int, int]]] | None = None,
        window_seconds: float = 60.0,
    ) -> None:
        """`symbols` maps a unified symbol (BTC/USDT) to its listing time in ms; `now_ms` None: real time;
        `holes` maps (symbol, interval) to inclusive (first, last) open-time ranges the exchange lacks;
        `window_seconds` is the fixed window weight is counted in (Binance: a clock minute; tests shorten it)."""
        self.listings = {market_id(s): (s, listing) for s, listing in symbols.items()}
        # exchangeInfo's status per market id (BTCUSDT); unlisted: TRADING. Binance says BREAK for a halt.
        self.statuses: dict[str, str] = {}
        self.fixed_now_ms = now_ms
        self.weight_limit = weight_limit
        self.window_seconds = window_seconds
        self.script: collections.deque[str] = collections.deque()  # faults for the next klines requests, first
        self.latency = latency_ms / 1000.0
        self.faults = faults or Faults()
        self.holes = holes or {}
        self._random = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self._minute = -1
        self._used = 0
        self._banned_until = 0.0
        self.counts: Counter[str] = Counter()  # requests, 429, 418, injected faults, weight
        self.weight_per_minute: dict[int, int] = {}  # window number (wall clock // window) -> weight used
        self.weight_per_second: dict[int, int] = {}  # int(wall clock) -> weight used (a benchmark's timeline)
        self.klines_requests: list[dict] = []
        self.request_headers: list[dict[str, str]] = []  # every request's headers (what credentials reached us)
        # Keep each klines body made (klines_body): for a benchmark, which asks the same pages in each run.
        self.cache_pages = False
        self._pages: dict[tuple[str, str, int, int], bytes] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- Data -----------------------------------------------------------------------------------------

    @property
    def holes(self) -> dict[tuple[str, str], list[tuple[int, int]]]:
        return self._holes

    @holes.setter
    def holes(self, value: dict[tuple[str, str], list[tuple[int, int]]]) -> None:
        # Keyed by market id (BTCUSDT) inside; tests may name unified symbols (BTC/USDT) or ids.
        self._holes = {(market_id(symbol), interval): ranges for (symbol, interval), ranges in value.items()}

    def now_ms(self) -> int:
        return self.fixed_now_ms if self.fixed_now_ms is not None else int(time.time() * 1000)

    def has_candle(self, market: str, interval: str, ts: int) -> bool:
        return not any(first <= ts <= last for first, last in self.holes.get((market, interval), ()))

    def kline(self, market: str, interval: str, ts: int) -> list:
        step = INTERVALS_MS[interval]
        base = 100.0 + 1000.0 * _unit(market)
        open_ = base * (1 + 0.05 * (_unit(market, interval, ts, "o") - 0.5))
        close = base * (1 + 0.05 * (_unit(market, interval, ts, "c") - 0.5))
        high = max(open_, close) * (1 + 0.01 * _unit(market, interval, ts, "h"))
        low = min(open_, close) * (1 - 0.01 * _unit(market, interval, ts, "l"))
        volume = 1000 * _unit(market, interval, ts, "v")
        return [
            ts,
            f"{open_:.8f}",
            f"{high:.8f}",
            f"{low:.8f}",
            f"{close:.8f}",
            f"{volume:.8f}",
            ts + step - 1,
            f"{volume * close:.8f}",
            int(volume),
            f"{volume / 2:.8f}",
            f"{volume * close / 2:.8f}",
            "0",
        ]

    def klines_body(self, market: str, interval: str, first: int, last: int) -> bytes:
        """The JSON body of every candle opening in [first, last] (no holes there), as `kline()` rows.

        The same bytes as `json.dumps([self.kline(...) for ts in ...], separators=(",", ":"))` (a test checks
        it) with less CPU: the hash input is built as text instead of repr() of a tuple, and each row is one
        f-string (the values are bare numbers, which JSON quotes without escaping). Bodies are kept when
        `cache_pages` is set: a benchmark asks the same pages in each run, and `warm()` makes them before its
        clock starts.
        """
        key = (market, interval, first, last)
        body = self._pages.get(key)
        if body is not None:
            return body
        step = INTERVALS_MS[interval]
        base = 100.0 + 1000.0 * _unit(market)
        prefix = f"({market!r}, {interval!r}, "
        blake2b, unpack, scale = hashlib.blake2b, struct.unpack, 2.0**64
        parts = []
        for ts in range(first, last + 1, step):
            head = f"{prefix}{ts}, "
            u_o = unpack(">Q", blake2b(f"{head}'o')".encode(), digest_size=8).digest())[0] / scale
            u_c = unpack(">Q", blake2b(f"{head}'c')".encode(), digest_size=8).digest())[0] / scale
            u_h = unpack(">Q", blake2b(f"{head}'h')".encode(), digest_size=8).digest())[0] / scale
            u_l = unpack(">Q", blake2b(f"{head}'l')".encode(), digest_size=8).digest())[0] / scale
            u_v = unpack(">Q", blake2b(f"{head}'v')".encode(), digest_size=8).digest())[0] / scale
            open_ = base * (1 + 0.05 * (u_o - 0.5))
            close = base * (1 + 0.05 * (u_c - 0.5))
            high = max(open_, close) * (1 + 0.01 * u_h)
            low = min(open_, close) * (1 - 0.01 * u_l)
            volume = 1000 * u_v
            parts.append(
                f'[{ts},"{open_:.8f}","{high:.8f}","{low:.8f}","{close:.8f}","{volume:.8f}",{ts + step - 1},'
                f'"{volume * close:.8f}",{int(volume)},"{volume / 2:.8f}","{volume * close / 2:.8f}","0"]'
            )
        body = ("[" + ",".join(parts) + "]").encode()
        if self.cache_pages:
            with self._lock:
                self._pages[key] = body
        return body

    def page_bounds(
        self, market: str, interval: str, start: int | None, end: int | None, limit: int
    ) -> tuple[int, int]:
        """(first, last) open times of the page `klines()` answers, when the series has no holes."""
        step = INTERVALS_MS[interval]
        forming = self.now_ms() // step * step
        last = forming if end is None else min(forming, end // step * step)
        if start is None:
            first = max(self.first_open(market, interval), last - (limit - 1) * step)
        else:
            first = max(self.first_open(market, interval), -(-start // step) * step)
        return first, min(last, first + (limit - 1) * step)

    def warm(self, symbol: str, interval: str, start: int, limit: int = 1000) -> int:
        """Make and keep the bodies of the pages a client paging from `start` asks for; returns their count."""
        market, step = market_id(symbol), INTERVALS_MS[interval]
        self.cache_pages = True
        pages = 0
        first, last = self.page_bounds(market, interval, start, None, limit)
        while first <= last:
            self.klines_body(market, interval, first, last)
            pages += 1
            first, last = self.page_bounds(market, interval, last + step, None, limit)
        return pages

    def first_open(self, market: str, interval: str) -> int:
        step = INTERVALS_MS[interval]
        _, listing = self.listings[market]
        return -(-listing // step) * step

    def closed_candles(self, symbol: str, interval: str, start_ms: int = 0, end_ms: int | None = None) -> list[list]:
        """What a complete collection must end with: every closed candle as a float ccxt row, ascending."""
        market = market_id(symbol)
        step = INTERVALS_MS[interval]
        last = self.now_ms() // step * step - step
        if end_ms is not None:
            last = min(last, end_ms)
        first = max(self.first_open(market, interval), -(-start_ms // step) * step)
        rows = []
        for ts in range(first, last + 1, step):
            if self.has_candle(market, interval, ts):
                rows.append([ts, *(float(v) for v in self.kline(market, interval, ts)[1:6])])
        return rows

    def klines(self, market: str, interval: str, start: int | None, end: int | None, limit: int) -> list[list]:
        step = INTERVALS_MS[interval]
        now = self.now_ms()
        forming = now // step * step
        last = forming if end is None else min(forming, end // step * step)
        if start is None:
            # Binance: without startTime, the newest `limit` candles ending at endTime (or now).
            first = max(self.first_open(market, interval), last - (limit - 1) * step)
        else:
            first = max(self.first_open(market, interval), -(-start // step) * step)
        rows = []
        ts = first
        while ts <= last and len(rows) < limit:
            if self.has_candle(market, interval, ts):
                rows.append(self.kline(market, interval, ts))
            ts += step
        return rows

    def exchange_info(self) -> dict:
        symbols = []
        for market, (symbol, _) in sorted(self.listings.items()):
            base, quote = symbol.split("/")
            symbols.append(
                {
                    "symbol": market,
                    "status": self.statuses.get(market, "TRADING"),
                    "baseAsset": base,
                    "baseAssetPrecision": 8,
                    "quoteAsset": quote,
                    "quotePrecision": 8,
                    "quoteAssetPrecision": 8,
                    "baseCommissionPrecision": 8,
                    "quoteCommissionPrecision": 8,
                    "orderTypes": ["LIMIT", "MARKET"],
                    "icebergAllowed": True,
                    "ocoAllowed": True,
                    "quoteOrderQtyMarketAllowed": True,
                    "isSpotTradingAllowed": True,
                    "isMarginTradingAllowed": False,
                    "filters": [
                        {"filterType": "PRICE_FILTER", "minPrice": "0.01", "maxPrice": "1000000", "tickSize": "0.01"},
                        {"filterType": "LOT_SIZE", "minQty": "0.00001", "maxQty": "9000", "stepSize": "0.00001"},
                        {"filterType": "NOTIONAL", "minNotional": "5", "maxNotional": "9000000"},
                    ],
                    "permissions": ["SPOT"],
                    "permissionSets": [["SPOT"]],
                    "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
                    "allowedSelfTradePreventionModes": ["EXPIRE_MAKER"],
                }
            )
        return {
            "timezone": "UTC",
            "serverTime": self.now_ms(),
            # As Binance announces them; only REQUEST_WEIGHT is enforced here.
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": self.weight_limit},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
                {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
                {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
            ],
            "exchangeFilters": [],
            "symbols": symbols,
        }

    # --- Weight ---------------------------------------------------------------------------------------

    def charge(self, weight: int) -> tuple[int, float | None, int | None]:
        """Count `weight` in the current fixed minute: (used, retry_after, status) with status 429/418."""
        with self._lock:
            wall = time.time()
            minute = int(wall // self.window_seconds)
            if minute != self._minute:
                self._minute, self._used = minute, 0
            self._used += weight
            self.counts["weight"] += weight
            self.weight_per_minute[minute] = self.weight_per_minute.get(minute, 0) + weight
            self.weight_per_second[int(wall)] = self.weight_per_second.get(int(wall), 0) + weight
            to_next_minute = (minute + 1) * self.window_seconds - wall
            if wall < self._banned_until:
                # Binance: ignoring a 429's Retry-After gets the IP banned (418), for longer each time.
                self._banned_until = wall + 120
                self.counts["418"] += 1
                return self._used, 120.0, 418
            if self._used > self.weight_limit:
                self._banned_until = wall + to_next_minute
                self.counts["429"] += 1
                return self._used, max(1, math.ceil(to_next_minute)), 429
            return self._used, None, None

    def use_weight(self, weight: int) -> None:
        """Someone else on this IP spends `weight` in the current window (another program, a browser)."""
        with self._lock:
            minute = int(time.time() // self.window_seconds)
            if minute != self._minute:
                self._minute, self._used = minute, 0
            self._used += weight

    def used_weight(self) -> int:
        with self._lock:
            return self._used if self._minute == int(time.time() // self.window_seconds) else 0

    # --- Serving --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def ccxt_options(self, **extra: object) -> dict:
        """Connector options pointing ccxt.binance's spot endpoints at this server."""
        api = f"{self.url}/api/v3"
        urls = {"api": {"public": api, "private": api, "v1": f"{self.url}/api/v1"}}
        return {"urls": urls, **extra}

    def start(self) -> "FakeBinance":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-binance", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeBinance":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def draw(self, choices: "list | tuple"):
        """One of `choices`, from the faults' seeded generator (a run is repeatable)."""
        with self._lock:
            return self._random.choice(list(choices))

    def draw_fault(self) -> str | None:
        faults = self.faults
        with self._lock:
            if self.script:
                fault = self.script.popleft()
                return fault or None
            roll = self._random.random()
        for name in ("server_error", "binance_error", "reset", "timeout", "short_page", "empty_page", "truncated"):
            share = getattr(faults, name)
            if roll < share:
                return name
            roll -= share
        return None


def _make_handler(fake: FakeBinance) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # The headers and the body are two writes: with Nagle's algorithm the body would wait for the
        # client's delayed ACK of the headers (~40 ms on Linux), a delay no real exchange adds.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: object, headers: dict[str, str] | None = None, raw: bytes | None = None):
            payload = raw if raw is not None else json.dumps(body, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(payload)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query).items()}
            fake.counts["requests"] += 1
            fake.request_headers.append(dict(self.headers.items()))
            if fake.latency:
                time.sleep(fake.latency)
            weight = WEIGHTS.get(url.path)
            if weight is None:
                self._send(404, {"code": -1, "msg": f"fake binance does not serve {url.path}"})
                return
            used, retry_after, status = fake.charge(weight)
            headers = {"X-MBX-USED-WEIGHT-1M": str(used)}
            if status is not None:
                headers["Retry-After"] = str(int(retry_after or 1))
                msg = "Way too much request weight used; IP banned." if status == 418 else "Too much request weight."
                self._send(status, {"code": -1003, "msg": msg}, headers)
                return
            if url.path == "/api/v3/time":
                self._send(200, {"serverTime": fake.now_ms()}, headers)
            elif url.path == "/api/v3/ping":
                self._send(200, {}, headers)
            elif url.path == "/api/v3/exchangeInfo":
                self._send(200, fake.exchange_info(), headers)
            else:
                self._klines(params, headers)

        def _klines(self, params: dict[str, str], headers: dict[str, str]) -> None:
            market, interval = params.get("symbol", ""), params.get("interval", "")
            if market not in fake.listings:
                self._send(400, {"code": -1121, "msg": "Invalid symbol."}, headers)
                return
            if interval not in INTERVALS_MS:
                self._send(400, {"code": -1120, "msg": "Invalid interval."}, headers)
                return
            try:
                limit = int(params.get("limit", 500))
                start = int(params["startTime"]) if "startTime" in params else None
                end = int(params["endTime"]) if "endTime" in params else None
            except ValueError:
                self._send(400, {"code": -1100, "msg": "Illegal characters found in a parameter."}, headers)
                return
            if not 1 <= limit <= 1000:
                self._send(400, {"code": -1130, "msg": "Invalid data sent for a parameter."}, headers)
                return
            fake.klines_requests.append({"symbol": market, "interval": interval, "start": start, "limit": limit})
            fault = fake.draw_fault()
            if fault:
                fake.counts[fault] += 1
            if fault == "server_error":
                status = fake.draw([500, 502, 503])
                self._send(status, None, headers, raw=b"<html><body>Service Unavailable</body></html>")
                return
            if fault == "binance_error":
                code = fake.draw(fake.faults.binance_codes)
                status, msg = BINANCE_ERRORS[code]
                self._send(status, {"code": code, "msg": msg}, headers)
                return
            if fault == "reset":
                # SO_LINGER 0: close() sends a RST, so the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if fault == "timeout":
                time.sleep(fake.faults.timeout_seconds)
            if fault in ("empty_page", "short_page") or (market, interval) in fake.holes:
                rows = fake.klines(market, interval, start, end, limit)
                if fault == "empty_page":
                    rows = []
                elif fault == "short_page" and len(rows) > 1:
                    rows = rows[: max(1, len(rows) // 3)]
                body = json.dumps(rows, separators=(",", ":")).encode()
            else:
                body = fake.klines_body(market, interval, *fake.page_bounds(market, interval, start, end, limit))
            if fault == "truncated" and len(body) > 2:
                body = body[: len(body) // 2]
            self._send(200, None, headers, raw=body)

    return Handler
