"""Argument checks of the client operations: what durable refuses before any SQL runs.

A wrong type is an `ArgumentTypeError` (also a TypeError), a value durable cannot take an
`ArgumentError` (also a ValueError); a run id no run can have is simply not found.
"""

from __future__ import annotations

from datetime import timedelta

from durable.db import storable
from durable.errors import ArgumentError, ArgumentTypeError, RunNotFound


def run_id_arg(run_id: object) -> str:
    """`run_id` checked: a string (else `ArgumentTypeError`) that some run could have (a
    NUL or a lone surrogate, which PostgreSQL cannot store, is `RunNotFound`)."""
    if not isinstance(run_id, str):
        raise ArgumentTypeError(f"a run id is a string, got {type(run_id).__name__}")
    if not storable(run_id):
        raise RunNotFound(f"no run with id {run_id!r}")
    return run_id


def text_arg(value: object, what: str, *, empty: bool = True) -> None:
    """Refuse `value` unless it is a string PostgreSQL can store (and not empty, unless
    `empty`)."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{what} must be a string, got {type(value).__name__}")
    if (not empty and not value) or not storable(value):
        raise ArgumentError(
            f"{what} must be a {'' if empty else 'non-empty '}string without NUL or lone "
            f"surrogates, got {value!r}"
        )


def count_arg(value: object, what: str) -> None:
    """Refuse `value` unless it is an int >= 1 (a bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{what} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ArgumentError(f"{what} must be >= 1, got {value}")


def age_arg(value: object, what: str) -> float:
    """`value` checked as an age (a `timedelta` not below zero), in seconds."""
    if not isinstance(value, timedelta):
        raise ArgumentTypeError(f"{what} must be a datetime.timedelta, got {type(value).__name__}")
    seconds = value.total_seconds()
    if seconds < 0:
        raise ArgumentError(f"{what} must not be negative")
    return seconds
