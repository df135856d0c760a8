"""Flow control declarations: named limits, debounced starts, and the checks of the other
flow-control options of `Workflow`, `Workflow.step` and `Engine.start` (pure; no I/O).

What they do at run time is in sql/functions.sql (bounds, slots, tokens, admissions) and
docs/guides/flow-control.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from durable.errors import ArgumentError, ArgumentTypeError, ConfigurationError, DefinitionError
from durable.nodes import MAX_WAIT

#: Run priorities go from -100 to 100; higher runs first; 0 by default.
MIN_PRIORITY, MAX_PRIORITY = -100, 100
#: Limit names and keys are joined with this character in the database.
_SEPARATOR = "\x1f"
_MAX_KEY = 1000


def _count(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{what} must be an integer >= 1 or None, got {value!r}")
    if value < 1:
        raise ArgumentError(f"{what} must be >= 1, got {value!r}")
    return value


def _seconds(value: object, what: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgumentTypeError(f"{what} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0) or value > MAX_WAIT:
        bound = "> 0" if positive else ">= 0"
        raise ArgumentError(f"{what} must be {bound} and <= {MAX_WAIT:.0f} seconds, got {value!r}")
    return float(value)


def _key(value: object, what: str) -> str:
    """A key as stored: a non-empty string (an int is taken as its decimal text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    if not value or "\x00" in value or len(value) > _MAX_KEY:
        raise ArgumentError(
            f"{what} must be a non-empty string without NUL of at most {_MAX_KEY} characters, "
            f"got {value[:40]!r}"
        )
    return value


@dataclass(frozen=True)
class Limit:
    """A named bound on the steps that use it, declared on the engine:
    `Engine(limits={"stripe": Limit(rate=100, per=1.0, concurrency=20)})` and
    `wf.step("charge", charge, limit="stripe", limit_key=...)`.

    `concurrency`: at most that many attempts in flight at once; `rate`: at most that many
    attempt starts in any window of `per` seconds (a sliding window, so no burst goes above
    `rate`). Both hold per key when the step has a `limit_key`, across every worker and
    process, as they are kept in PostgreSQL. A step that cannot get a slot or a token waits
    without using an attempt or a worker slot, and is claimed when it can run.
    Raises `ArgumentError` (or `ArgumentTypeError`) for a bad value.
    """

    rate: int | None = None
    per: float = 1.0
    concurrency: int | None = None

    def __post_init__(self) -> None:
        _count(self.rate, "Limit rate")
        _count(self.concurrency, "Limit concurrency")
        object.__setattr__(self, "per", _seconds(self.per, "Limit per", positive=True))
        if self.rate is None and self.concurrency is None:
            raise ArgumentError("a Limit needs a rate, a concurrency, or both")


@dataclass(frozen=True)
class Debounce:
    """Coalesce starts: `engine.start(wf, input, debounce=Debounce(key="shop-7", seconds=5,
    max_wait=60))`.

    Starts of the workflow with the same `key` while its run is pending coalesce into that
    one run, whose input is the latest start's; it starts `seconds` after the last start, or
    `max_wait` seconds after the first one if that comes sooner (None: no cap). Raises
    `ArgumentError` (or `ArgumentTypeError`) for a bad value.
    """

    key: str
    seconds: float
    max_wait: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", _key(self.key, "Debounce key"))
        object.__setattr__(
            self, "seconds", _seconds(self.seconds, "Debounce seconds", positive=False)
        )
        if self.max_wait is not None:
            object.__setattr__(
                self, "max_wait", _seconds(self.max_wait, "Debounce max_wait", positive=False)
            )


# -- checks of the options elsewhere -------------------------------------------------------


def check_concurrency(
    concurrency: object, concurrency_key: object, what: str
) -> tuple[int | None, Callable[[dict[str, Any]], Any] | None]:
    """`Workflow(concurrency=, concurrency_key=)`, checked (`DefinitionError` if bad)."""
    try:
        bound = _count(concurrency, f"{what}: concurrency")
    except (ArgumentError, ArgumentTypeError) as exc:
        raise DefinitionError(str(exc)) from None
    if concurrency_key is not None:
        if not callable(concurrency_key):
            raise DefinitionError(
                f"{what}: concurrency_key must be a function of the input, got {concurrency_key!r}"
            )
        if bound is None:
            raise DefinitionError(f"{what}: concurrency_key needs a concurrency bound")
    return bound, concurrency_key


def concurrency_key_of(
    workflow: str,
    concurrency: int | None,
    concurrency_key: Callable[[dict[str, Any]], Any] | None,
    input: dict[str, Any],
) -> str | None:
    """The key a run of `workflow` counts under (None: no bound; '' without a key function).
    Raises `ArgumentError` when the key function raises or returns something unusable."""
    if concurrency is None:
        return None
    if concurrency_key is None:
        return ""
    try:
        value = concurrency_key(input)
    except Exception as exc:
        raise ArgumentError(
            f"concurrency_key of workflow {workflow!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    return _key(value, f"concurrency_key of workflow {workflow!r}")


def check_step_limit(
    limit: object, limit_key: object, what: str
) -> tuple[str | None, Callable[..., Any] | None]:
    """`step(limit=, limit_key=)`, checked (`DefinitionError` if bad)."""
    if limit is not None:
        check_limit_name(limit, f"{what}: limit", DefinitionError)
    if limit_key is not None:
        if not callable(limit_key):
            raise DefinitionError(f"{what}: limit_key must be a function of the context")
        if limit is None:
            raise DefinitionError(f"{what}: limit_key needs a limit")
    return limit, limit_key  # type: ignore[return-value]


def check_limit_name(name: object, what: str, error: type[Exception]) -> str:
    """A usable limit name, or `error`."""
    if not isinstance(name, str) or not name or "\x00" in name or _SEPARATOR in name:
        raise error(f"{what} must be a non-empty name without NUL or \\x1f, got {name!r}")
    return name


def check_limits(limits: object) -> dict[str, Limit]:
    """`Engine(limits=...)`, checked (`ConfigurationError` if bad)."""
    if limits is None:
        return {}
    if not isinstance(limits, Mapping):
        raise ConfigurationError(
            f"limits must be a mapping of name -> durable.Limit, got {limits!r}"
        )
    out: dict[str, Limit] = {}
    for name, limit in limits.items():
        check_limit_name(name, "a limit name", ConfigurationError)
        if not isinstance(limit, Limit):
            raise ConfigurationError(f"limit {name!r} must be a durable.Limit, got {limit!r}")
        out[name] = limit
    return out


def limit_key_text(value: object, what: str) -> str:
    """The key a `limit_key` function returned, as stored."""
    return _key(value, what)


def wait_key(limit: str, key: str) -> str:
    """How the database names the slots and tokens of `limit` for `key`."""
    return f"{limit}{_SEPARATOR}{key}"


@dataclass(frozen=True)
class StartOptions:
    """The flow-control options of one `Engine.start`, checked."""

    priority: int = 0
    delay: float | None = None
    start_at: datetime | None = None
    singleton_key: str | None = None
    debounce: Debounce | None = None


def check_start(
    *,
    priority: object,
    delay: object,
    start_at: object,
    singleton_key: object,
    debounce: object,
    idempotency_key: object,
) -> StartOptions:
    """The flow-control options of `Engine.start`, or `ArgumentError`/`ArgumentTypeError`."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ArgumentTypeError(f"priority must be an integer, got {priority!r}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ArgumentError(
            f"priority must be from {MIN_PRIORITY} to {MAX_PRIORITY}, got {priority!r}"
        )
    if delay is not None and start_at is not None:
        raise ArgumentError("give delay or start_at, not both")
    seconds = None if delay is None else _seconds(delay, "delay", positive=False)
    if start_at is not None and (not isinstance(start_at, datetime) or start_at.tzinfo is None):
        raise ArgumentTypeError(f"start_at must be an aware datetime, got {start_at!r}")
    key = None if singleton_key is None else _key(singleton_key, "singleton_key")
    if debounce is not None:
        if not isinstance(debounce, Debounce):
            raise ArgumentTypeError(f"debounce must be a durable.Debounce, got {debounce!r}")
        clash = [
            name
            for name, value in (
                ("delay", delay),
                ("start_at", start_at),
                ("singleton_key", singleton_key),
                ("idempotency_key", idempotency_key),
            )
            if value is not None
        ]
        if clash:
            raise ArgumentError(
                f"debounce decides when the run starts and which run a start joins: it does "
                f"not go with {', '.join(clash)}"
            )
    return StartOptions(priority, seconds, start_at, key, debounce)
