"""The exception hierarchy: every error `durable` raises is a `DurableError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from durable.model import Run


class DurableError(Exception):
    """Raised for any failure that `durable` itself detects; the root of all its errors."""


class DefinitionError(DurableError):
    """Raised when a workflow definition is invalid (bad name, duplicate node, bad option)."""


class WorkflowNotFound(DurableError):
    """Raised when a workflow name is not registered with the engine."""


class RunNotFound(DurableError):
    """Raised when no run has the given id."""


class SerializationError(DurableError):
    """Raised when an input, result or payload cannot be stored as JSON."""


class ConfigurationError(DurableError):
    """Raised when the engine is configured wrongly (bad schema name, no DSN, closed engine)."""


class DatabaseUnavailable(DurableError):
    """Raised when PostgreSQL cannot be reached."""


class RunFailed(DurableError):
    """Raised by `Engine.wait` when the run ended `failed`; `.run` is the final `Run`."""

    def __init__(self, run: Run) -> None:
        super().__init__(f"run {run.id} ({run.workflow}) failed: {run.error}")
        self.run = run


class RunCancelled(DurableError):
    """Raised by `Engine.wait` when the run ended `cancelled`; `.run` is the final `Run`."""

    def __init__(self, run: Run) -> None:
        super().__init__(f"run {run.id} ({run.workflow}) was cancelled")
        self.run = run


class NonRetryable(DurableError):
    """Raise it in a handler to fail the node at once, without further attempts."""


class IllegalTransition(DurableError):
    """Raised when a run is asked to move between statuses that do not connect: the
    database's status guard refused the change (the allowed edges are in
    sql/schema.sql, `runs_status_guard_v1`). `.run_id`, `.from_status` and `.to_status`
    say which run and which change. Nothing of the refused statement was written."""

    def __init__(self, run_id: str, from_status: str, to_status: str) -> None:
        super().__init__(run_id, from_status, to_status)
        self.run_id = run_id
        self.from_status = from_status
        self.to_status = to_status

    def __str__(self) -> str:
        return (
            f"run {self.run_id} cannot move from {self.from_status!r} to {self.to_status!r} "
            "(the database refuses that status change)"
        )


class DefinitionChanged(DurableError):
    """Raised (as a node's failure) when a run's journal no longer matches the workflow
    definition that serves it."""


class WorkerLost(DurableError):
    """Raised (as an attempt's failure) when the worker running the attempt vanished: its
    lease lapsed, or workers died holding the job again and again."""


class ChildFailed(DurableError):
    """Raised (as a node's failure) when a child run ended failed or cancelled, or was
    purged."""


class SignalTimeout(DurableError):
    """Raised (as a node's failure) when a signal wait without a default timed out."""


class SwallowedDatabaseError(DurableError):
    """Raised (as an attempt's failure) when a handler caught a database error on
    `ctx.conn` and returned as if nothing happened: the transaction was aborted."""


class ArgumentError(DurableError, ValueError):
    """Raised when an argument has the right type but a value durable cannot take (an empty
    or NUL-bearing name or key, a negative duration, an unknown signal name)."""


class ArgumentTypeError(DurableError, TypeError):
    """Raised when an argument has a type durable cannot take (an input that is not a
    mapping)."""


class IdempotencyConflict(DurableError):
    """Raised by `Engine.start` when its idempotency key already names a run started with
    another input (Stripe-style: a key stands for one request)."""


class ScheduleNotFound(DurableError):
    """Raised when no schedule has the given name (or, for `Engine.trigger`, when this
    engine does not declare it)."""
