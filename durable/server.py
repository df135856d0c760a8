"""A throwaway PostgreSQL server for tests, the demo and local use.

`LocalPostgres` runs `initdb` and `pg_ctl` on a fresh data directory and listens on a free
loopback port. The binaries come from the `pgserver` package when it is installed (it bundles
a server), else from `initdb`/`pg_ctl` on the machine. PostgreSQL refuses to run as root, so
when we are root the server runs as an unprivileged system user created on first use.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from durable.errors import DurableError

_SERVER_USER = "durable_pg"

# fsync and synchronous_commit stay on: tests and benchmarks must see real durable commits.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "max_connections": "300",
    "shared_buffers": "128MB",
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "log_min_messages": "fatal",
    "max_locks_per_transaction": "256",
}


def _find_bin_dir() -> Path:
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)
    except Exception:
        pass
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise DurableError(
        "no PostgreSQL server binaries found: install the 'server' extra "
        "(pip install 'durable[server]') or put initdb/pg_ctl on PATH, or set DURABLE_DSN"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """Return the account to run the server as, or None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_SERVER_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                _SERVER_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(_SERVER_USER)


class LocalPostgres:
    """A private PostgreSQL server on a loopback port, with its own data directory.

    Use it as a context manager, or call `start()` and `stop()`. `dsn` is the connection
    string of the `postgres` database as the `postgres` superuser (trust auth, loopback only).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="durable-pg-"))
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.port = _free_port()
        self._bin = _find_bin_dir()
        self._user = _server_user()
        self._running = False

    @property
    def dsn(self) -> str:
        """Connection string of the `postgres` database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, exe: str, *args: str, timeout: float = 60) -> None:
        preexec: Callable[[], None] | None = None
        if self._user is not None:
            uid, gid = self._user.pw_uid, self._user.pw_gid

            def preexec() -> None:
                os.setgid(gid)
                os.setuid(uid)

        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        result = subprocess.run(
            [str(self._bin / exe), *args],
            preexec_fn=preexec,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd="/",
        )
        if result.returncode != 0:
            raise DurableError(f"{exe} failed ({result.returncode}): {result.stderr.strip()}")

    def start(self) -> str:
        """Initialise the data directory if needed, start the server, return its DSN."""
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self._user is not None:
                os.chown(self.data_dir, self._user.pw_uid, self._user.pw_gid)
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        self._start_server()
        return self.dsn

    def _start_server(self) -> None:
        opts = " ".join(f"-c {k}={v}" if v else f"-c {k}=''" for k, v in self.settings.items())
        opts += f" -p {self.port}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "-l",
            str(self.data_dir / "server.log"),
            "start",
        )
        self._running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` rolls back open transactions; `immediate` is a crash)."""
        if self._running:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")
            self._running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port, keeping the data."""
        self.stop(mode)
        self._start_server()

    def cleanup(self) -> None:
        """Stop the server and delete the data directory if we created it."""
        with contextlib.suppress(DurableError):
            self.stop("immediate")
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def provision(env_var: str = "DURABLE_DSN") -> Iterator[str]:
    """Yield a DSN: `$env_var` if set, else a throwaway local server, else a container.

    The throwaway server (bundled `pgserver` binaries or local `initdb`/`pg_ctl`) is removed
    on exit. testcontainers is tried only when no binaries exist and a Docker engine answers.
    """
    dsn = os.environ.get(env_var)
    if dsn:
        yield dsn
        return
    try:
        server = LocalPostgres()
    except DurableError:
        if not _docker_answers():
            raise
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield str(container.get_connection_url())
        return
    with server:
        yield server.dsn
