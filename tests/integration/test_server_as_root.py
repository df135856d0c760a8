"""The throwaway server as root, from a checkout only root can enter (issue 11, item 9).

PostgreSQL refuses to run as root, so `LocalPostgres` runs it as the `durable_pg` user.
With the binaries inside a 0700 directory (a virtualenv in `mktemp -d`) that user could not
execute them and `initdb` failed with PermissionError; with a 0700 temporary directory it
could not reach its data directory either.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from durable import server
from durable.errors import DurableError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the server user exists only as root")


@pytest.fixture
def closed_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="durable-root-only-"))  # mode 0700, owner root
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bundled_bin() -> Path:
    try:
        bin_dir = server._find_bin_dir()
    except DurableError as exc:
        pytest.skip(f"no PostgreSQL binaries: {exc}")
    if not (bin_dir.parent.parent.parent / "pgserver.libs").is_dir():
        pytest.skip("the binaries are not pgserver's bundled ones")
    return bin_dir


def test_reachable_by_reads_the_permission_bits(closed_dir: Path) -> None:
    user = pwd.getpwnam("nobody")
    (closed_dir / "inner").mkdir()
    assert not server.reachable_by(closed_dir / "inner", user)
    closed_dir.chmod(0o711)
    assert server.reachable_by(closed_dir / "inner", user)


async def test_binaries_and_data_dir_in_root_only_directories(
    closed_dir: Path, bundled_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The layout of a virtualenv's site-packages, inside a directory only root can enter.
    site = closed_dir / "venv" / "site-packages"
    shutil.copytree(bundled_bin.parent, site / "pgserver" / "pginstall", symlinks=True)
    shutil.copytree(bundled_bin.parent.parent.parent / "pgserver.libs", site / "pgserver.libs")
    monkeypatch.setattr(server, "_find_bin_dir", lambda: site / "pgserver" / "pginstall" / "bin")
    tmp = closed_dir / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    with server.LocalPostgres() as pg:
        user = pwd.getpwnam("durable_pg")
        assert server.reachable_by(pg._bin, user)
        assert server.reachable_by(pg.data_dir, user)
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert await conn.fetchval("SELECT current_setting('server_version_num')::int") > 0
        finally:
            await conn.close()
    assert not pg.data_dir.exists()


def test_a_planted_cache_is_refused(
    closed_dir: Path, bundled_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache directory someone else could have written is never executed."""
    shared = closed_dir / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    monkeypatch.setattr(server, "_SHARED_TMP", shared)
    site = closed_dir / "venv"
    shutil.copytree(bundled_bin.parent, site / "pgserver" / "pginstall", symlinks=True)
    first = server._reachable_bin_dir(
        site / "pgserver" / "pginstall" / "bin", pwd.getpwnam("durable_pg")
    )
    cache = first.parent.parent.parent
    cache.chmod(0o777)  # as if another user had made it
    with pytest.raises(DurableError, match="not a root-owned"):
        server._reachable_bin_dir(
            site / "pgserver" / "pginstall" / "bin", pwd.getpwnam("durable_pg")
        )
