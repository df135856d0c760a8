"""Typed user code (issue 16): a small application module that uses the typed forms
(`Workflow(input=...)`, `Context[In]`, `SyncContext[In]`, `LoopContext[In]`, typed results;
tests/unit/typed_user_code/typed_app.py) type-checks under `mypy --strict`, and a wrong
field of `ctx.input` is reported (typo_app.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

USER_CODE = Path(__file__).parent / "typed_user_code"


def test_typed_user_code_passes_mypy_strict_and_a_wrong_field_is_reported(
    tmp_path: Path,
) -> None:
    pytest.importorskip("mypy")
    for name in ("typed_app.py", "typo_app.py"):
        (tmp_path / name).write_text((USER_CODE / name).read_text())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "--hide-error-context",
            "--no-error-summary",
            "typed_app.py",
            "typo_app.py",
        ],
        cwd=tmp_path,
        # This checkout's durable, not an installed one.
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not [e for e in errors if e.startswith("typed_app.py")], errors
    typo = line_of("typo_app.py", "ctx.input.skew")
    assert f'typo_app.py:{typo}: error: "OrderIn" has no attribute "skew"  [attr-defined]' in errors
    # A handler of an untyped Context registered on a typed workflow.
    untyped = line_of("typo_app.py", 'order.step("untyped"')
    assert any(e.startswith(f"typo_app.py:{untyped}: error:") and "[arg-type]" in e for e in errors)


def line_of(name: str, text: str) -> int:
    lines = (USER_CODE / name).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)
