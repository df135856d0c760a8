"""A throwaway PostgreSQL server for tests, the demo and local use.

`LocalPostgres` runs `initdb` and `pg_ctl` on a fresh data directory and listens on a free
loopback port. The binaries come from the `pgserver` package when it is installed (it bundles
a server), else from `initdb`/`pg_ctl` on the machine.

PostgreSQL refuses to run as root, so when we are root the server runs as the unprivileged
system user `durable_pg`, created (and logged, once) on first use. That user must be able to
reach the binaries and the data directory. A virtualenv inside a directory only root can
enter (`mktemp -d`, `/root/src`) hides the bundled binaries from it, so they are copied once
into a root-owned, world-readable cache (`/var/tmp/durable-pg-bin-<hash>`), and the data
directory is created under `/var/tmp` when the usual temporary directory is not reachable.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from durable.errors import DurableError

log = logging.getLogger("durable.server")

_SERVER_USER = "durable_pg"
# Where binaries and data directories go when the server user cannot reach the usual places:
# world-traversable (sticky) on every Linux, and not cleared at boot like /tmp may be.
_SHARED_TMP = Path("/var/tmp")

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
        with warnings.catch_warnings():
            # pgserver asks platformdirs for a runtime directory at import, which warns when
            # XDG_RUNTIME_DIR is unset (containers, root shells): noise for our users.
            warnings.simplefilter("ignore")
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
        "(pip install 'durable-pg[server]') or put initdb/pg_ctl on PATH, or set DURABLE_DSN"
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
        log.warning(
            "running as root: creating the system user %r (no home, no login shell) to run "
            "the throwaway PostgreSQL, which refuses to run as root",
            _SERVER_USER,
        )
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


def reachable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """True when `user` can traverse every directory down to `path` (and enter `path`).

    Judged from the permission bits (root's `os.access` answers for root, not for `user`);
    supplementary groups are ignored, which errs on the side of copying.
    """
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        try:
            st = current.stat()
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            break
        if st.st_uid == user.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid == user.pw_gid:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


def _safe_cache(path: Path) -> bool:
    """True when `path` is a directory only root can have written (root-owned, not group- or
    world-writable): anything else in a shared directory could be someone else's plant."""
    st = path.lstat()
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == 0
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _reachable_bin_dir(bin_dir: Path, user: pwd.struct_passwd) -> Path:
    """`bin_dir`, or a copy of its installation that `user` can reach.

    The installation is `bin_dir`'s parent (bin, lib, share: PostgreSQL finds its files
    relative to its binaries). The copy keeps the layout two levels up, because pgserver's
    binaries load their libraries from `$ORIGIN/../../../pgserver.libs`. It is made once
    per server build and reused; it is built under a temporary name and renamed into place,
    so concurrent first uses never see half a copy.
    """
    if reachable_by(bin_dir, user):
        return bin_dir
    install = bin_dir.parent
    package = install.parent
    # Keyed by the server binary's content, not its path: every fresh virtualenv of the same
    # pgserver release shares one copy instead of leaving 35 MB behind per path.
    server_binary = bin_dir / "postgres"
    digest = hashlib.sha256(server_binary.read_bytes()).hexdigest()[:12]
    cache = _SHARED_TMP / f"durable-pg-bin-{digest}"
    copied_bin = cache / package.name / install.name / bin_dir.name
    if cache.exists():
        if not _safe_cache(cache):
            raise DurableError(
                f"{cache} exists but is not a root-owned, non-writable directory; "
                "remove it and try again"
            )
        return copied_bin
    log.warning(
        "the PostgreSQL binaries in %s are not reachable by the system user %r (a directory "
        "above them is closed to other users): copying them to %s",
        install,
        user.pw_name,
        cache,
    )
    staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}.", dir=_SHARED_TMP))
    try:
        shutil.copytree(install, staging / package.name / install.name, symlinks=True)
        libs = package.parent / f"{package.name}.libs"  # auditwheel's bundled libraries
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        staging.chmod(0o755)  # mkdtemp makes it 0700
        try:
            staging.rename(cache)
        except OSError:  # another process finished its copy first
            if not (cache.exists() and _safe_cache(cache)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return copied_bin


class LocalPostgres:
    """A private PostgreSQL server on a loopback port, with its own data directory.

    Use it as a context manager, or call `start()` and `stop()`. `dsn` is the connection
    string of the `postgres` database as the `postgres` superuser (trust auth, loopback only).
    `bin_dir`: the directory of `initdb` and `pg_ctl` to use (default: the bundled server,
    else the machine's). A data directory that already holds a cluster (a base backup, for
    a standby) is started as it is.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._owns_dir = data_dir is None
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.port = _free_port()
        self._bin = Path(bin_dir) if bin_dir is not None else _find_bin_dir()
        self._user = _server_user()
        if self._user is not None:
            self._bin = _reachable_bin_dir(self._bin, self._user)
        if data_dir is not None:
            self.data_dir = Path(data_dir)
            parent = self.data_dir.resolve().parent
            if self._user is not None and not reachable_by(parent, self._user):
                raise DurableError(
                    f"the data directory {self.data_dir} is inside a directory the server "
                    f"user {self._user.pw_name!r} cannot enter; choose one under {_SHARED_TMP}"
                )
        else:
            base = Path(tempfile.gettempdir())
            if self._user is not None and not reachable_by(base, self._user):
                base = _SHARED_TMP
            self.data_dir = Path(tempfile.mkdtemp(prefix="durable-pg-", dir=base))
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
                os.setgroups([])  # drop root's supplementary groups too
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
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
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
