"""Exit codes, environment variable names and the value types of the `durable` command's
arguments (durations, positive numbers, timestamps), and its argparse parser class."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime, timedelta
from typing import NoReturn

EXIT_OK = 0
EXIT_NOT_DONE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERNAL = 4

DSN_ENV = "DURABLE_DSN"
READ_DSN_ENV = "DURABLE_READ_DSN"
APP_ENV = "DURABLE_APP"


class UsageError(Exception):
    """A mistake of the user's (bad argument, unknown run...): one line, exit 2."""


_DURATION = re.compile(r"(\d+)([wdhms])")
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_duration(text: str) -> timedelta:
    """Parse `30d`, `12h`, `90m`, `45s`, `2w` or combinations such as `1d12h`."""
    compact = text.strip().lower().replace(" ", "")
    if not compact or _DURATION.sub("", compact):
        raise UsageError(
            f"invalid duration {text!r}: use a number and a unit, e.g. 30d, 12h, 90m, 45s"
        )
    total = timedelta()
    for amount, unit in _DURATION.findall(compact):
        total += timedelta(**{_UNITS[unit]: int(amount)})
    return total


def positive_int(text: str) -> int:
    """An argument that must be an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argument that must be a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def timestamp(text: str) -> datetime:
    """An ISO 8601 time; without a zone, local time."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time, e.g. 2026-05-01T14:00:00+02:00"
        ) from None
    return value if value.tzinfo is not None else value.astimezone()


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with EXIT_USAGE."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"durable: error: {message}\n")
