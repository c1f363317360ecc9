"""Run every benchmark (`python -m benchmarks`) or the named ones (`python -m benchmarks scheduler`).

Each `benchmarks/bench_<name>.py` has a `main() -> None` that prints its figures. Benchmarks measure;
they assert nothing. They use the database at DATABASE_URL (a scratch database is created per run).
"""

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    names = sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )
    names = argv or names
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        module.main()
        print(f"--- {name}: {time.perf_counter() - started:.1f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
