"""The live hub's fan-out: 1,000 WebSocket clients subscribed to one series, p50/p99 from a candle's
commit to its arrival at every client.

One uvicorn process serves the ASGI app as `make run` and the image do (websockets-sansio, no
permessage-deflate) with the Redis channel layer (REDIS_URL, default redis://127.0.0.1:6379/0);
CLIENT_PROCESSES processes hold the connections, each a lean client (`client`) so that they take as
little as they can of the cores they share with the server. This process is the publisher: it upserts a
candle into the store (committed), takes the time, and publishes it as run_scheduler does after a run
(`live.candle_messages` of the candles the run wrote, sent by `live.publisher`). Latency = arrival at a
client - commit, on one machine's clock. A first candle, reported apart, starts the publisher's thread and
Redis connection as a long-running scheduler has them. Also printed: the last arrival of each candle, the
CPU the server and the clients spent per candle, and the load average (the machine may be shared).

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
    """A client process: `count` connections, each subscribed; prints ready, then each arrival as JSON.

    Each connection is an asyncio Protocol around websockets' sans-I/O client (handshake, frames, pings,
    permessage-deflate offered as browsers do): an arrival is timed in `data_received`, with no task per
    connection, so the client processes (on the same cores as the server) take as little CPU as they can.
    """
    from websockets.client import ClientProtocol
    from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
    from websockets.frames import Opcode
    from websockets.http11 import Response
    from websockets.uri import parse_uri

    subscribe = json.dumps({"action": "subscribe", "channel": "ohlcv", "exchange": SERIES[0], "symbol": SERIES[1],
                            "timeframe": SERIES[2]}).encode()  # fmt: skip
    uri = parse_uri(url)
    arrivals: list = []  # (arrival time, text)
    subscribed: list = []
    finished: list = []

    class Connection(asyncio.Protocol):
        def __init__(self, ready: asyncio.Event, done: asyncio.Event) -> None:
            self.ws = ClientProtocol(uri, extensions=enable_client_permessage_deflate(None))
            self.ready, self.done, self.received = ready, done, -1  # the first text is "subscribed"

        def connection_made(self, transport: asyncio.Transport) -> None:
            self.transport = transport
            self.ws.send_request(self.ws.connect())
            self.flush()

        def data_received(self, data: bytes) -> None:
            arrived = time.time()
            self.ws.receive_data(data)
            for event in self.ws.events_received():
                if isinstance(event, Response):
                    assert event.status_code == 101, event.status_code
                    self.ws.send_text(subscribe)
                elif event.opcode is Opcode.TEXT:
                    self.received += 1
                    if self.received == 0:
                        subscribed.append(1)
                        if len(subscribed) == count:
                            self.ready.set()
                    else:
                        arrivals.append((arrived, event.data))
                        if self.received == candles:
                            finished.append(1)
                            if len(finished) == count:
                                self.done.set()
            self.flush()  # the handshake, the subscription, pongs

        def flush(self) -> None:
            data = self.ws.data_to_send()
            if data:
                self.transport.write(b"".join(data))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready, done = asyncio.Event(), asyncio.Event()
        connections = []
        for _ in range(count):
            connections.append(await loop.create_connection(lambda: Connection(ready, done), uri.host, uri.port))
            await asyncio.sleep(0.002)  # do not open them all in one burst
        await ready.wait()
        print("ready", flush=True)
        cpu = time.process_time()
        try:
            await asyncio.wait_for(done.wait(), timeout=candles * INTERVAL + 120)
        finally:
            cpu = time.process_time() - cpu
            parsed = [(json.loads(text)["candle"]["ts"], arrived) for arrived, text in arrivals]
            print(json.dumps({"cpu": cpu, "arrivals": parsed}), flush=True)

    asyncio.run(main())


def publish_candle(store, live, i: int) -> float:
    """Store candle `i` of the series (committed), then publish it as run_scheduler does after a run;
    returns the commit's time."""
    ts = T0 + i * 60_000
    price = 42_000.0 + i
    rows = [[ts, price, price + 5, price - 5, price + 1, 12.5]]
    store.upsert_candles(*SERIES, rows)
    committed = time.time()
    live.publisher.publish_many(live.candle_messages(*SERIES, rows, {}))
    return committed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
             str(port), "--ws", "websockets-sansio", "--log-level", "warning", "--no-access-log",
             "--ws-per-message-deflate", "false"],
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
                    [
                        sys.executable,
                        "-c",
                        f"from benchmarks.bench_hub import client; client({url!r}, {n}, {CANDLES + 1})",
                    ],
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

            # A long-running scheduler's publisher has its thread and Redis connection up: one candle
            # before the measured ones (reported apart) starts them.
            warm_up = publish_candle(store, live, -1)
            time.sleep(1.0)
            committed: dict[int, float] = {}
            server_cpu = cpu_seconds(server.pid)
            load = os.getloadavg()[0]
            for i in range(CANDLES):
                ts = T0 + i * 60_000
                committed[ts] = publish_candle(store, live, i)
                time.sleep(INTERVAL)
            load = max(load, os.getloadavg()[0])
            latencies, per_candle, client_cpu = [], {}, 0.0
            for process in clients:
                out, _ = process.communicate(timeout=CANDLES * INTERVAL + 180)
                result = json.loads(out.splitlines()[-1])
                client_cpu += result["cpu"]
                for ts, arrived in result["arrivals"]:
                    if ts in committed:
                        latencies.append((arrived - committed[ts]) * 1000)
                        per_candle.setdefault(ts, []).append(latencies[-1])
                    else:
                        warm_up_latency = (arrived - warm_up) * 1000
            server_cpu = cpu_seconds(server.pid) - server_cpu
        finally:
            for process in (*clients, server):
                if process.poll() is None:
                    process.kill()
                    process.wait()
        expected = CLIENTS * CANDLES
        latencies.sort()
        print(f"{CANDLES} candles x {CLIENTS} clients: {len(latencies):,} of {expected:,} deliveries arrived "
              f"(the warm-up candle before them: {warm_up_latency:.0f} ms)")  # fmt: skip
        if latencies:
            p50 = statistics.median(latencies)
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(f"commit -> arrival: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms "
                  f"(goal: p99 < 100 ms)")  # fmt: skip
            print("last arrival per candle, ms: " + " ".join(f"{max(v):.0f}" for _, v in sorted(per_candle.items())))
        print(f"CPU per candle: server {server_cpu / CANDLES * 1000:.0f} ms, the client processes "
              f"{client_cpu / CANDLES * 1000:.0f} ms")  # fmt: skip
        print(f"load average while measuring: up to {load:.1f} on {os.cpu_count()} cores (other work on the machine "
              f"shares them with the server and the client processes)")  # fmt: skip
