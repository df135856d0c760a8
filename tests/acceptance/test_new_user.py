"""A new user's first hour: the built wheel, installed into a fresh virtualenv outside the
repository, runs the README example and the quickstart as pasted from the pages.

The virtualenv lives in a directory only its owner can enter (what `mktemp -d` makes), so
as root this also proves that the throwaway PostgreSQL, which then runs as the `durable_pg`
user, reaches the bundled server binaries. No `DURABLE_DSN`: every program starts its own
server, as on a fresh machine. Installing needs the package index (pip's ordinary client).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import durable

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.network, pytest.mark.timeout(900)]

EXAMPLE_BLOCK = re.compile(
    r"<!-- example: (?P<path>[^\s:]+)(?::[\w-]+)? -->\n```python\n(?P<code>.*?)\n```", re.DOTALL
)


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DURABLE_DSN", "DURABLE_TEST_DSN", "PYTHONPATH", "VIRTUAL_ENV")
    }
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def pasted(page: Path, example: str) -> str:
    """The code block a reader copies from `page`: the one showing `example`."""
    for match in EXAMPLE_BLOCK.finditer(page.read_text(encoding="utf-8")):
        if match["path"] == example:
            return match["code"] + "\n"
    raise AssertionError(f"{page.name} shows no block of {example}")


@pytest.fixture(scope="module")
def user_venv() -> Iterator[tuple[Path, Path]]:
    """(bin directory of a fresh venv with the wheel and its server extra, a work dir)."""
    home = Path(tempfile.mkdtemp(prefix="durable-new-user-"))  # mode 0700, like mktemp -d
    try:
        dist = home / "dist"
        built = _run(
            [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)], cwd=home
        )
        assert built.returncode == 0, _explain(built)
        (wheel,) = dist.glob("durable_pg-*.whl")
        venv = home / "venv"
        made = _run(["python3", "-m", "venv", str(venv)], cwd=home)
        assert made.returncode == 0, _explain(made)
        installed = _run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[server]"],
            cwd=home,
            timeout=600,
        )
        assert installed.returncode == 0, _explain(installed)
        work = home / "project"
        work.mkdir()
        yield venv / "bin", work
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_the_installed_command_says_its_version(user_venv: tuple[Path, Path]) -> None:
    bin_dir, work = user_venv
    proc = _run([str(bin_dir / "durable"), "--version"], cwd=work)
    assert proc.returncode == 0, _explain(proc)
    assert proc.stdout.split()[:2] == ["durable", durable.__version__]
    where = _run(
        [str(bin_dir / "python"), "-c", "import durable; print(durable.__file__)"], cwd=work
    )
    assert str(bin_dir.parent) in where.stdout, "imported the repository, not the installed wheel"


def test_the_readme_example_runs_as_pasted(user_venv: tuple[Path, Path]) -> None:
    bin_dir, work = user_venv
    (work / "order.py").write_text(pasted(ROOT / "README.md", "docs/examples/readme.py"))
    proc = _run([str(bin_dir / "python"), "order.py"], cwd=work)
    assert proc.returncode == 0, _explain(proc)
    assert "'charge': 'charged 10'" in proc.stdout
    assert "'approval': {'by': 'ann'}" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_the_quickstart_runs_as_pasted(user_venv: tuple[Path, Path]) -> None:
    bin_dir, work = user_venv
    page = ROOT / "docs" / "quickstart.md"
    (work / "quickstart.py").write_text(pasted(page, "docs/examples/quickstart.py"))
    proc = _run([str(bin_dir / "python"), "quickstart.py"], cwd=work)
    assert proc.returncode == 0, _explain(proc)
    assert "welcome mail queued for account 1" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_the_demo_runs_from_the_installed_wheel(user_venv: tuple[Path, Path]) -> None:
    bin_dir, work = user_venv
    proc = _run([str(bin_dir / "durable"), "demo"], cwd=work)
    assert proc.returncode == 0, _explain(proc)
    assert "4 completed, 2 failed" in proc.stdout
    assert "all as expected" in proc.stdout
