"""The live hub's fan-out: 1,000 WebSocket clients subscribed to one series, p50/p99 from a candle's
commit to its arrival at every client.

One uvicorn process serves the ASGI app with the Redis channel layer (REDIS_URL, default
redis://127.0.0.1:6379/0); CLIENT_PROCESSES processes hold the connections (asyncio + websockets). This
process is the publisher: it upserts a candle into the store (committed), takes the time, and calls
`live.publish_candles` as run_scheduler does after a run (which reads the candle and its indicator row
back and sends it). Latency = arrival at a client - commit, on one machine's clock.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dc_hub SECRET_KEY=x .venv/bin/python -m benchmarks hub

A scratch database beside DATABASE_URL's (<name>_bench_hub) is created, migrated and dropped.
"""

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.scratch import scratch_database

CLIENTS = 1000
CLIENT_PROCESSES = 2
CANDLES = 30
INTERVAL = 0.5  # seconds between candles
SERIES = ("bench", "BTC/USDT", "1m")
T0 = 1_704_067_200_000


def client(url: str, count: int, candles: int) -> None:
    """A client process: `count` connections, each subscribed; prints ready, then each arrival as JSON."""
    import websockets

    async def one(arrivals: list, ready: asyncio.Event, subscribed: list) -> None:
        async with websockets.connect(url, max_queue=None, open_timeout=120) as ws:
            await ws.send(
                json.dumps({"action": "subscribe", "channel": "ohlcv", "exchange": SERIES[0], "symbol": SERIES[1],
                            "timeframe": SERIES[2]})
            )  # fmt: skip
            assert json.loads(await ws.recv())["type"] == "subscribed"
            subscribed.append(1)
            if len(subscribed) == count:
                ready.set()
            received = 0
            while received < candles:
                message = json.loads(await ws.recv())
                if message["type"] == "ohlcv":
                    arrivals.append((message["candle"]["ts"], time.time()))
                    received += 1

    async def main() -> None:
        arrivals: list = []
        ready = asyncio.Event()
        subscribed: list = []
        tasks = []
        for _ in range(count):
            tasks.append(asyncio.create_task(one(arrivals, ready, subscribed)))
            await asyncio.sleep(0.002)  # do not open them all in one burst
        await ready.wait()
        print("ready", flush=True)
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=candles * INTERVAL + 120)
        finally:
            print(json.dumps(arrivals), flush=True)

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    with scratch_database("hub"):
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from rest_framework.authtoken.models import Token

        from apps.marketdata import store
        from apps.monitoring import live

        user = get_user_model().objects.create_superuser("bench", password="bench-password-1")
        token = Token.objects.create(user=user).key
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "datacollector.asgi:application", "--host", "127.0.0.1", "--port",
             str(port), "--ws", "websockets-sansio", "--log-level", "warning", "--no-access-log"],
            cwd=settings.BASE_DIR,
        )  # fmt: skip
        clients: list[subprocess.Popen] = []
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            url = f"ws://127.0.0.1:{port}/ws?token={token}"
            per_process = [
                CLIENTS // CLIENT_PROCESSES + (i < CLIENTS % CLIENT_PROCESSES) for i in range(CLIENT_PROCESSES)
            ]
            started = time.monotonic()
            clients = [
                subprocess.Popen(
                    [sys.executable, "-c", f"from benchmarks.bench_hub import client; client({url!r}, {n}, {CANDLES})"],
                    cwd=Path(__file__).resolve().parent.parent,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for n in per_process
            ]
            for process in clients:
                assert process.stdout.readline().strip() == "ready"
            print(f"{CLIENTS} clients connected and subscribed in {time.monotonic() - started:.1f}s "
                  f"({CLIENT_PROCESSES} client processes, 1 uvicorn process, Redis pub/sub layer)")  # fmt: skip

            committed: dict[int, float] = {}
            for i in range(CANDLES):
                ts = T0 + i * 60_000
                price = 42_000.0 + i
                store.upsert_candles(*SERIES, [[ts, price, price + 5, price - 5, price + 1, 12.5]])
                committed[ts] = time.time()
                live.publish_candles(*SERIES, ts, ts)
                time.sleep(INTERVAL)
            latencies = []
            for process in clients:
                out, _ = process.communicate(timeout=CANDLES * INTERVAL + 180)
                latencies += [(arrived - committed[ts]) * 1000 for ts, arrived in json.loads(out.splitlines()[-1])]
        finally:
            for process in (*clients, server):
                if process.poll() is None:
                    process.kill()
                    process.wait()
        expected = CLIENTS * CANDLES
        latencies.sort()
        print(f"{CANDLES} candles x {CLIENTS} clients: {len(latencies):,} of {expected:,} deliveries arrived")
        if latencies:
            p50 = statistics.median(latencies)
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(f"commit -> arrival: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms "
                  f"(goal: p99 < 100 ms)")  # fmt: skip
        print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
