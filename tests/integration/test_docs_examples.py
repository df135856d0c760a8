"""The code the docs show: every `docs/examples/*.py` runs to completion, as a reader would
run it (`python docs/examples/NAME.py`), against a fresh database given as `DURABLE_DSN`;
and the pages show exactly that code, as self-contained Markdown (no include directives),
with the API reference written out from the docstrings (`python docs/sync_docs.py`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import durable
from durable.errors import DurableError
from durable.server import LocalPostgres

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
SNIPPET = re.compile(r'^\s*--8<-- "(docs/examples/[^":]+\.py)(?::[^"]*)?"', re.MULTILINE)

sys.path.insert(0, str(DOCS))
import sync_docs  # noqa: E402  (docs/sync_docs.py is a script, not a package module)

PAGES = sync_docs.pages()


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
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        shown.update(SNIPPET.findall(text))
        shown.update(sync_docs.marked_examples(text))
    assert shown, "no page shows an example"
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


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_pages_show_the_example_files_as_they_are(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    expected = sync_docs.reference() if page == sync_docs.REFERENCE else sync_docs.sync_page(text)
    assert text == expected, f"{_name(page)} is out of date: run `python docs/sync_docs.py`"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_pages_read_as_plain_markdown(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert not SNIPPET.findall(text), f"{_name(page)} has include directives GitHub cannot show"
    assert not re.search(r"^::: ", text, re.MULTILINE), f"{_name(page)} has mkdocstrings lines"
    # An autorefs link such as [`Run`][durable.Run] is a broken link outside mkdocs.
    assert not re.search(r"\]\[durable\.", text), f"{_name(page)} has mkdocs-only links"


def test_the_reference_names_every_public_name_once() -> None:
    text = sync_docs.REFERENCE.read_text(encoding="utf-8")
    headings = re.findall(r"^#{1,3} (.+)$", text, re.MULTILINE)
    assert len(headings) == len(set(headings)), "a heading appears twice in the contents"
    for name in durable.__all__:
        if name != "__version__":
            assert f"### durable.{name}" in text or f"### durable.context.{name}" in text, name


def test_the_quickstart_page_shows_the_whole_file_before_explaining_it() -> None:
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    whole = (DOCS / "examples" / "quickstart.py").read_text(encoding="utf-8")
    assert "<!-- example: docs/examples/quickstart.py -->" in text
    assert text.index("```python") < text.index("## What it does")
    assert sync_docs.section("docs/examples/quickstart.py", None) in text
    assert "import durable" in whole


def test_the_readme_example_is_the_tested_file() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- example: docs/examples/readme.py:readme -->" in text
    assert "CREATE TABLE IF NOT EXISTS reservations" in text
