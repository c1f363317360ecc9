"""`acquire_token` throughput and latency on one shared bucket with 1, 4 and 8 contending processes.

The bucket is large enough that every call is granted, so the figures are those of the statement
itself (one UPDATE ... RETURNING on one hot row). A second table runs `acquire()` against a small
bucket and compares the weight granted with the budget (capacity + refill x time).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dc_sched_bench SECRET_KEY=x .venv/bin/python -m benchmarks ratelimit

A scratch database beside DATABASE_URL's (<name>_bench_ratelimit) is created, migrated and dropped.
"""

import json
import os
import statistics
import sys
import time

from benchmarks.bench_scheduler import run_children, wait_for_go
from benchmarks.scratch import scratch_database

PROCESS_COUNTS = (1, 4, 8)
SECONDS = 4.0
LIMITED_CAPACITY = 100.0
LIMITED_REFILL = 1000.0


def child(mode: str, seconds: float) -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacollector.settings")
    django.setup()
    from apps.ratelimits.models import RateLimit, RateLimitTimeout

    RateLimit.objects.filter(exchange_id="bench").exists()  # connect before the start
    start_at = wait_for_go()
    latencies: list[float] = []
    granted = 0
    end_at = start_at + seconds
    if mode == "token":
        while time.time() < end_at:
            started = time.perf_counter()
            wait = RateLimit.objects.acquire_token("bench", 1)
            latencies.append(time.perf_counter() - started)
            granted += wait == 0.0
    else:
        while (remaining := end_at - time.time()) > 0:
            try:
                RateLimit.objects.acquire("bench", 1, timeout=remaining)
            except RateLimitTimeout:
                break
            granted += 1
    print(json.dumps({"granted": granted, "latencies": latencies}))


def _bucket(capacity: float, refill: float) -> None:
    from apps.ratelimits.models import RateLimit

    RateLimit.objects.filter(exchange_id="bench").delete()
    RateLimit.objects.create(exchange_id="bench", capacity=capacity, refill_per_second=refill, tokens=capacity)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    with scratch_database("ratelimit"):
        print(f"acquire_token on one row, every call granted, {SECONDS:.0f}s per configuration")
        print(f"{'procs':>5} {'grants/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
        for processes in PROCESS_COUNTS:
            _bucket(1e15, 1e12)
            outputs = [json.loads(o.strip().splitlines()[-1]) for o in _run("token", processes)]
            latencies = [latency for output in outputs for latency in output["latencies"]]
            granted = sum(output["granted"] for output in outputs)
            print(
                f"{processes:>5} {granted / SECONDS:>9.0f} {statistics.median(latencies) * 1000:>7.2f} "
                f"{_percentile(latencies, 0.99) * 1000:>7.2f}",
                flush=True,
            )
        budget = LIMITED_CAPACITY + LIMITED_REFILL * SECONDS
        print(f"acquire() against capacity {LIMITED_CAPACITY:.0f}, refill {LIMITED_REFILL:.0f}/s: budget {budget:.0f}")
        print(f"{'procs':>5} {'granted':>8} {'of budget':>10}")
        for processes in (4, 8):
            _bucket(LIMITED_CAPACITY, LIMITED_REFILL)
            granted = sum(json.loads(o.strip().splitlines()[-1])["granted"] for o in _run("acquire", processes))
            print(f"{processes:>5} {granted:>8} {granted / budget:>10.1%}", flush=True)


def _run(mode: str, processes: int) -> list[str]:
    return run_children("benchmarks.bench_ratelimit", processes, [mode, str(SECONDS)])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], float(sys.argv[3]))
    else:
        main()
