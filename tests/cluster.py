"""A primary and a streaming standby on loopback, for the failover and read-replica tests.

Built with PostgreSQL's own tools, as an operator would: `initdb` for the primary,
`pg_basebackup -R` for the standby (it writes the standby's `primary_conninfo` and
`standby.signal`), `pg_ctl stop -m immediate` to crash the primary and `pg_ctl promote`
to make the standby the new primary. When we are root both servers run as the
unprivileged server user of `durable.server` (PostgreSQL refuses to run as root).

The standby streams as `standby1` (its `cluster_name`). With `synchronous=True` the
primary names it in `synchronous_standby_names` with `synchronous_commit=on`: a commit
returns only once the standby has flushed it. The standby itself runs without
`synchronous_standby_names`, so once promoted it commits on its own.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import asyncpg

from durable.server import LocalPostgres

STANDBY_NAME = "standby1"
_TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")


def replication_bin_dir() -> Path | None:
    """The newest local PostgreSQL binary directory with initdb, pg_ctl and pg_basebackup."""

    def major(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else 0

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if all((Path(candidate) / tool).exists() for tool in _TOOLS):
            return Path(candidate)
    return None


SKIP_REASON = (
    "needs local PostgreSQL server binaries with initdb, pg_ctl and pg_basebackup under "
    "/usr/lib/postgresql/<version>/bin (e.g. the postgresql-15 package)"
)


class Server(LocalPostgres):
    """A `LocalPostgres` that can also be promoted and can run the other server tools."""

    def tool(self, exe: str, *args: str, timeout: float = 120) -> None:
        """Run one of the server's tools (`pg_basebackup`...) as the server user."""
        self._run(exe, *args, timeout=timeout)

    def promote(self) -> None:
        """Turn this standby into a primary and wait until it accepts writes."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "promote")

    @property
    def user(self) -> tuple[int, int] | None:
        """(uid, gid) the server runs as, or None when it runs as ourselves."""
        return None if self._user is None else (self._user.pw_uid, self._user.pw_gid)


class Cluster:
    """A primary and one streaming standby; use `with Cluster(...) as cluster:`."""

    def __init__(
        self,
        bin_dir: Path,
        *,
        synchronous: bool = True,
        primary_settings: Mapping[str, str] | None = None,
        standby_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.synchronous = synchronous
        self.primary = Server(
            bin_dir=bin_dir,
            settings={
                "wal_level": "replica",
                "max_wal_senders": "5",
                "synchronous_standby_names": STANDBY_NAME if synchronous else "",
                "synchronous_commit": "on",
                **(primary_settings or {}),
            },
        )
        self._base = self.primary.data_dir.parent
        self._standby_dir = Path(tempfile.mkdtemp(prefix="durable-standby-", dir=self._base))
        user = self.primary.user
        if user is not None:
            os.chown(self._standby_dir, *user)
        self.standby = Server(
            self._standby_dir,
            bin_dir=bin_dir,
            settings={
                "cluster_name": STANDBY_NAME,
                "hot_standby": "on",
                **(standby_settings or {}),
            },
        )

    def start(self) -> None:
        """Start the primary, clone it with `pg_basebackup -R`, start the standby."""
        self.primary.start()
        # No transaction commits on the primary before the standby streams: with a
        # synchronous standby named, a commit would wait for it.
        self.primary.tool(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self._standby_dir),
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
        self.standby.start()

    def dsn(self, database: str = "postgres", **params: str) -> str:
        """A multi-host DSN over both servers that connects to whichever accepts writes."""
        query = "&".join(
            f"{k}={v}" for k, v in {"target_session_attrs": "read-write", **params}.items()
        )
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{database}?{query}"
        )

    @staticmethod
    def single(server: Server, database: str = "postgres", **params: str) -> str:
        """A DSN of one server of the cluster."""
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://postgres@127.0.0.1:{server.port}/{database}" + (
            f"?{query}" if query else ""
        )

    async def wait_streaming(self, timeout: float = 60.0) -> None:
        """Wait until the standby streams (and, if synchronous, is the sync standby)."""
        wanted = "sync" if self.synchronous else "async"
        conn = await asyncpg.connect(self.single(self.primary))
        try:
            deadline = time.monotonic() + timeout
            while True:
                state = await conn.fetchval(
                    "SELECT sync_state FROM pg_stat_replication "
                    "WHERE application_name = $1 AND state = 'streaming'",
                    STANDBY_NAME,
                )
                if state == wanted:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"the standby is not streaming ({state!r})")
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    async def wait_replayed(self, database: str, sql: str, timeout: float = 30.0) -> None:
        """Wait until `sql` (a boolean query) is true on the standby."""
        deadline = time.monotonic() + timeout
        conn = await asyncpg.connect(self.single(self.standby, database))
        try:
            while True:
                try:
                    if await conn.fetchval(sql):
                        return
                except asyncpg.UndefinedTableError:
                    pass  # the standby has not replayed the table's creation yet
                if time.monotonic() > deadline:
                    raise AssertionError(f"the standby did not replay: {sql}")
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    def cleanup(self) -> None:
        """Stop both servers and delete their data directories."""
        self.standby.cleanup()
        self.primary.cleanup()
        shutil.rmtree(self._standby_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
