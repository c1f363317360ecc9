"""A private PostgreSQL cluster that a test may stop and start: never the shared server on 5432.

`initdb` and `pg_ctl` from /usr/lib/postgresql/<newest>/bin create and run it in a temporary directory on
a free port of 127.0.0.1 (the unix socket stays in that directory). PostgreSQL refuses to run as root,
so as root (here and in CI) the commands run as the `postgres` OS user, which owns the directory.

Use the `pg_cluster` fixture (module-scoped: one cluster per test module). `migrated_database()` gives a
test its own database, copied from a template migrated once per cluster.
"""

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.conf import settings

COMMAND_TIMEOUT = 120
TEMPLATE = "dc_template"


def _bin_dir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not candidates:
        pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin")
    return candidates[-1].parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="dc-pgcluster-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count()
        self._template_ready = False
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=COMMAND_TIMEOUT, cwd=self.root)

    def start(self) -> None:
        # fsync off: the cluster lives for one test module, and a fast stop flushes everything anyway.
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def is_running(self) -> bool:
        command = [str(self.bin / "pg_ctl"), "-D", str(self.data), "status"]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, timeout=COMMAND_TIMEOUT, cwd=self.root).returncode == 0

    def ensure_started(self) -> None:
        """Start the cluster unless it runs (a test that failed half-way through an outage left it stopped)."""
        if not self.is_running():
            self.start()

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.url(database), autocommit=True)

    def migrated_database(self) -> str:
        """A new database with every migration applied; its name."""
        if not self._template_ready:
            with self.connect() as conn:
                conn.execute(f"CREATE DATABASE {TEMPLATE}")
            env = {**os.environ, "DATABASE_URL": self.url(TEMPLATE), "SECRET_KEY": "x"}
            subprocess.run(
                [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
                cwd=settings.BASE_DIR,
                env=env,
                check=True,
                timeout=COMMAND_TIMEOUT,
            )
            self._template_ready = True
        name = f"dc_test_{next(self._names)}"
        with self.connect() as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        return name


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
