"""The asyncpg boundary: pools, connection-loss detection, DSN redaction, error translation."""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import asyncpg

from durable.errors import (
    ArgumentError,
    ConfigurationError,
    DatabaseUnavailable,
    IdempotencyConflict,
    IllegalTransition,
    SerializationError,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    #: A connection as handlers and queries see it: plain, or borrowed from a pool.
    Connection = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection

# Errors that mean "the database went away or is restarting", not "this query is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # What asyncpg raises on a connection the server terminated mid-operation.
    asyncpg.InternalClientError,
    TimeoutError,
)

#: Seconds `create_pool` waits for a server to answer before giving up on a connection.
DEFAULT_CONNECT_TIMEOUT = 10.0

# Errors that no retry will fix: the DSN itself, the credentials or the database name is
# wrong. Callers (and the CLI's exit codes) must tell them apart from an outage.
_CONFIGURATION_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # a malformed DSN: bad port, bad IPv6 literal...
    asyncpg.ClientConfigurationError,  # unsupported scheme, bad option value
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,  # unknown role, no pg_hba.conf entry
    asyncpg.InvalidCatalogNameError,  # no such database
)

_PASSWORD_IN_URL = re.compile(r"(postgres(?:ql)?://[^:/@\s]*):[^@\s]*@", re.IGNORECASE)
# json.dumps writes NUL as \u0000; an even run of backslashes before it is escaped text.
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_PASSWORD_PARAM = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def redact(dsn: str) -> str:
    """Return `dsn` with any password replaced by `***`, safe to log or print."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1:***@", dsn))


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` means the connection or server is gone, so a retry later may work."""
    return (
        isinstance(exc, CONNECTION_ERRORS)
        # connection_exception (08xxx), admin/crash shutdown and the like (57Pxx)
        or (
            isinstance(exc, asyncpg.PostgresError)
            and (exc.sqlstate or "").startswith(("08", "57P"))
        )
    )


# lock_not_available (a lock_timeout ran out, NOWAIT) and deadlock_detected.
_LOCK_CONFLICTS = ("55P03", "40P01")

#: True while a worker runs a job after the first of a batch (durable.worker): a lock
#: that job would wait for may be held by another batch that waits for one of this batch.
in_batch: contextvars.ContextVar[bool] = contextvars.ContextVar("durable_in_batch", default=False)


class Deferred(Exception):
    """Raised when a job after the first of a batch could not get a lock in time: the
    batch commits without it and the job goes back to the queue, with nothing recorded."""


def is_lock_conflict(exc: BaseException | None) -> bool:
    """True when `exc`, or an error it was raised from, is a lock wait that gave up (a
    `lock_timeout`, `NOWAIT`) or a deadlock, or is `Deferred`."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, Deferred) or (
            isinstance(exc, asyncpg.PostgresError) and exc.sqlstate in _LOCK_CONFLICTS
        ):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


#: True while `acquire` gives back a connection on which only durable's own statements ran,
#: each in a transaction that ended: nothing of the session (a SET, a LISTEN, a session
#: advisory lock, an open cursor) can be left on it, so its release skips asyncpg's reset
#: query, a round trip per borrow (see `_reset`). Read in the releasing task's context.
_own_use: contextvars.ContextVar[bool] = contextvars.ContextVar("durable_own_use", default=False)


async def _reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Reset a connection given back to a pool: asyncpg's own reset (`RESET ALL`, `UNLISTEN
    *`, advisory locks, cursors), unless `acquire` gives it back after durable's statements
    only. asyncpg rolls back an open transaction and drops listeners before this either way.
    A start is two round trips with the reset query and one without it (docs/performance.md).
    """
    if _own_use.get():
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    server_settings: dict[str, str] | None = None,
    statement_cache_size: int = 256,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> asyncpg.Pool:
    """Open an asyncpg pool.

    Raises `ConfigurationError` when retrying cannot help (a malformed DSN, an unsupported
    scheme, a wrong password or user, a missing database) and `DatabaseUnavailable` when
    the server cannot be reached or does not answer within `connect_timeout` seconds (per
    connection attempt). Messages name the DSN with its password hidden.
    """
    where = redact(dsn)
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings=server_settings or None,
            # Workers reuse a handful of statements thousands of times a second.
            statement_cache_size=statement_cache_size,
            timeout=connect_timeout,
            reset=_reset,
        )
    except _CONFIGURATION_ERRORS as exc:
        if isinstance(exc, ValueError | asyncpg.ClientConfigurationError):
            raise ConfigurationError(f"invalid DSN {where}: {exc}") from exc
        raise ConfigurationError(f"the database at {where} refused the connection: {exc}") from exc
    except TimeoutError as exc:  # before CONNECTION_ERRORS: TimeoutError is an OSError
        raise DatabaseUnavailable(
            f"cannot connect to {where}: no answer within {connect_timeout:g} s "
            "(the server accepts connections but does not respond; raise connect_timeout "
            "if it is just slow)"
        ) from exc
    except CONNECTION_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise DatabaseUnavailable(f"cannot connect to {where}: {reason}") from exc
    assert pool is not None
    return pool


def _key_clash(value: Any) -> str | None:
    """A description of two keys of one object that JSON would write alike ({1: .., "1": ..}),
    or None. Only objects with non-string keys can have one."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not all(type(k) is str for k in item):
                seen: dict[str, Any] = {}
                for key in item:
                    text = key if isinstance(key, str) else json.dumps(key)  # as JSON writes it
                    if text in seen:
                        return f"keys {seen[text]!r} and {key!r} would both be stored as {text!r}"
                    seen[text] = key
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


def dumps(value: Any, what: str) -> str:
    """Serialize `value` to JSON text for a jsonb column, or raise `SerializationError`.

    `what` names the value in the message ("input of workflow 'order'", ...).
    """
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"{what} is not JSON-serializable: {exc}") from None
    if "\x00" in text or _ESCAPED_NUL.search(text):
        raise SerializationError(f"{what} contains a NUL character, which PostgreSQL cannot store")
    clash = _key_clash(value)
    if clash is not None:
        raise SerializationError(f"{what} is not storable as JSON without losing data: {clash}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"{what} contains a lone surrogate ({exc.object[exc.start : exc.end]!r}), which is "
            "not valid UTF-8 and cannot be stored"
        ) from None
    return text


def storable(text: str) -> bool:
    """Whether PostgreSQL can store `text` in a text column: no NUL, no lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def loads(text: str | None) -> Any:
    """Decode JSON text read from a jsonb column (`None` stays `None`)."""
    return None if text is None else json.loads(text)


# What runs_status_guard_v1 (sql/schema.sql) says when it refuses a status change.
_ILLEGAL_CHANGE = re.compile(
    r"illegal run status change (?P<old>\w+) -> (?P<new>\w+) for run (?P<run>.*)\Z", re.DOTALL
)


def translate(exc: BaseException) -> BaseException:
    """The `DurableError` an asyncpg error stands for, or `exc` itself.

    The one table of the database errors durable turns into its own: the status guard's
    refusal (`IllegalTransition`), the errors durable's SQL functions raise on purpose
    (DUxxx: `ConfigurationError`, `IdempotencyConflict`) and data exceptions (SQLSTATE
    class 22: a value PostgreSQL cannot take, `ArgumentError`). Connection failures are
    `DatabaseUnavailable` (see `acquire`); anything else is a bug, and passes unchanged.
    """
    if not isinstance(exc, asyncpg.PostgresError):
        return exc
    state = exc.sqlstate or ""
    message = str(getattr(exc, "message", None) or exc)
    text = message.removeprefix("durable: ")
    if state == "23514":  # check_violation: a CHECK constraint, or the status guard
        found = _ILLEGAL_CHANGE.search(message)
        if found is not None:
            return IllegalTransition(found["run"], found["old"], found["new"])
        return exc
    if state == "DU002":
        hint = getattr(exc, "hint", None)
        return ConfigurationError(f"{text} ({hint})" if hint else text)
    if state == "DU003":
        return IdempotencyConflict(text)
    if state.startswith("22"):
        return ArgumentError(f"a value PostgreSQL cannot take: {message}")
    return exc


class _Translated(contextlib.AbstractContextManager[None]):
    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            better = translate(exc)
            if better is not exc:
                raise better from exc


_TRANSLATED = _Translated()


def translated() -> contextlib.AbstractContextManager[None]:
    """A block whose asyncpg errors come out as the `DurableError` they stand for
    (`translate`). Used where durable runs its SQL on a connection it did not borrow
    through `acquire` (a caller's, a worker's)."""
    return _TRANSLATED


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool, where: str) -> AsyncIterator[Connection]:
    """Borrow a pooled connection; connection failures become `DatabaseUnavailable`.

    `where` names the database (a redacted DSN) in the message. Other errors of the
    database are translated (`translate`).
    """
    token: contextvars.Token[bool] | None = None
    try:
        async with pool.acquire() as conn:
            yield conn
            # The body ended normally: only durable's statements ran (callers of `acquire`
            # never hand the connection to user code), so the release skips the reset.
            token = _own_use.set(True)
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(f"lost the database at {where}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        better = translate(exc)
        if better is exc:
            raise
        raise better from exc
    finally:
        if token is not None:
            _own_use.reset(token)
