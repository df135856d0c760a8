"""The code the docs show: every `docs/examples/*.py` runs to completion, as a reader would
run it (`python docs/examples/NAME.py`), against a fresh database given as `DURABLE_DSN`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from durable.errors import DurableError
from durable.server import LocalPostgres

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
SNIPPET = re.compile(r'--8<-- "(docs/examples/[^":]+\.py)(?::[^"]*)?"')


async def run_example(path: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DURABLE_DSN", "DURABLE_TEST_DSN")}
    with anyio.fail_after(120):
        return await anyio.run_process(
            [sys.executable, str(path)],
            cwd=ROOT,
            env={**clean, "PYTHONDONTWRITEBYTECODE": "1", **env},
            check=False,
        )


def explain(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout.decode(errors='replace')}"
        f"\n--- stderr\n{proc.stderr.decode(errors='replace')}"
    )


def test_examples_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"quickstart", "nodes", "lifespan", "testing"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
async def test_example_runs(example: Path, db: Any) -> None:
    proc = await run_example(example, DURABLE_DSN=db.dsn)
    assert proc.returncode == 0, explain(proc)


def test_every_example_is_shown_in_the_docs() -> None:
    shown: set[str] = set()
    for page in DOCS.rglob("*.md"):
        shown.update(SNIPPET.findall(page.read_text(encoding="utf-8")))
    assert shown, "no page includes an example"
    missing = {f"docs/examples/{p.name}" for p in EXAMPLES} - shown
    assert not missing, f"examples no page includes: {sorted(missing)}"
    assert all((ROOT / s).is_file() for s in shown), "a page includes a missing file"


async def test_quickstart_starts_its_own_server_without_a_dsn() -> None:
    try:
        LocalPostgres().cleanup()  # only looks for server binaries; starts nothing
    except DurableError as exc:
        pytest.skip(f"no local PostgreSQL binaries: {exc}")
    proc = await run_example(DOCS / "examples" / "quickstart.py")
    assert proc.returncode == 0, explain(proc)
    assert b"welcome mail queued" in proc.stdout
