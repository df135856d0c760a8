"""The asyncpg boundary: pools, connection-loss detection, DSN redaction, error translation."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg

from durable.errors import DatabaseUnavailable, SerializationError

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


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    server_settings: dict[str, str] | None = None,
    statement_cache_size: int = 256,
) -> asyncpg.Pool:
    """Open an asyncpg pool, translating connection failures into `DatabaseUnavailable`."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings=server_settings or None,
            # Workers reuse a handful of statements thousands of times a second.
            statement_cache_size=statement_cache_size,
        )
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact(dsn)}: {exc}") from exc
    except asyncpg.InvalidCatalogNameError as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact(dsn)}: {exc}") from exc
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise DatabaseUnavailable(f"cannot connect to {redact(dsn)}: {exc}") from exc
    assert pool is not None
    return pool


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
    return text


def loads(text: str | None) -> Any:
    """Decode JSON text read from a jsonb column (`None` stays `None`)."""
    return None if text is None else json.loads(text)


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool, where: str) -> AsyncIterator[Connection]:
    """Borrow a pooled connection; connection failures become `DatabaseUnavailable`.

    `where` names the database (a redacted DSN) in the message. Errors about the query
    itself pass through unchanged.
    """
    try:
        async with pool.acquire() as conn:
            yield conn
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(f"lost the database at {where}: {exc}") from exc
