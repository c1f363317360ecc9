"""The monitoring tests' servers (uvicorn, schedulers) are started with `tests.jobs.conftest.track`; this
fixture, autouse, kills those still running after each test, as it does for tests/jobs."""

from tests.jobs.conftest import _kill_leftover_processes  # noqa: F401
