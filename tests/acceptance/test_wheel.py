"""The wheel ships the SQL (schema, migrations, queries) as package data, and the installed
package finds it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_contains_the_sql_and_py_typed(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("durable_pg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sql_files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sql").rglob("*.sql")}
    assert sql_files, "the repository has no SQL files?"
    for name in sql_files:
        assert f"durable/{name}" in names, name
    assert "durable/py.typed" in names
