"""One attempt of user code: the single wrapper every handler, select, condition, start,
duration and signal-name function runs under, whatever the node kind.

Inside the node's transaction the call's statements run under a savepoint (set lazily by
`StepConnection`), so a failure rolls back its writes alone and the attempt is recorded in
the same transaction. Whatever the call does ends as an `Ok` or an `Err`: any exception,
a `CancelledError` it lets escape (unless the worker itself is being cancelled), a database
error it swallowed, a result that cannot be stored, running past its time limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from durable.codec import Codec, encoded
from durable.context import Context, current_run
from durable.db import Deferred, dumps, in_batch, is_lock_conflict
from durable.errors import SwallowedDatabaseError
from durable.runtime.transition import Err, Ok, Outcome
from durable.stepconn import swallowed_error, undo


def _cut_off(ctx: Context[Any], what: str, limit: float, own: bool) -> TimeoutError:
    if own:
        return TimeoutError(f"attempt {ctx.attempt} of {what} timed out after {limit:g} s")
    return TimeoutError(
        f"attempt {ctx.attempt} of {what} ran longer than the transaction limit of {limit:g} s "
        "(Engine(transaction_timeout=...)); long external calls belong in "
        "transactional=False steps"
    )


async def run_attempt(
    ctx: Context[Any],
    what: str,
    call: Callable[[], Awaitable[Any]],
    *,
    timeout: float | None,
    transaction_timeout: float | None,
    store: bool = True,
    returns: Codec | None = None,
) -> Outcome:
    """Run `call` as attempt `ctx.attempt` of `what`; never raises for the call's doing.

    `timeout` is the node's own bound; inside a transaction the attempt is also cut off at
    `transaction_timeout` (a stuck handler must not hold locks and pin the vacuum horizon).
    A plain `def` handler is held to the same limits: its thread cannot be stopped, but
    its `ctx.conn` is closed before its writes are rolled back (`durable.runtime.threads`).
    `store`: the value must be stored, so it must serialize to JSON (through `returns`,
    the codec of the handler's return annotation, when it names a dataclass or a model).
    """
    limit = transaction_timeout if ctx.conn is not None else None
    own = timeout is not None and (limit is None or timeout <= limit)
    if own:
        limit = timeout
    token = current_run.set(ctx.run_id)
    try:
        try:
            if limit is None:
                value = await call()
            else:
                # In this task, not a task of its own (asyncio.wait_for): a call that does
                # not wait costs no trip through the event loop, and its time is its own.
                bound = asyncio.timeout(limit)
                try:
                    async with bound:
                        value = await call()
                except TimeoutError:
                    if bound.expired():
                        raise _cut_off(ctx, what, limit, own) from None
                    raise
                if bound.expired():  # the call swallowed the cancellation at its limit
                    raise _cut_off(ctx, what, limit, own)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the worker is stopping: not the attempt's doing
            raise RuntimeError(f"{what} let a CancelledError escape") from None
        swallowed = swallowed_error(ctx.conn)
        if swallowed is not None:
            raise SwallowedDatabaseError(
                f"{what} returned normally after a statement on ctx.conn failed "
                f"({type(swallowed).__name__}: {swallowed}); the transaction was aborted, "
                "so the attempt's writes were rolled back"
            )
        if not store:
            return Ok(value, "")
        where = f"result of {what}"
        return Ok(value, dumps(encoded(returns, value, where), where))
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        await undo(ctx.conn)
        conflict = is_lock_conflict(exc) or is_lock_conflict(swallowed_error(ctx.conn))
        if conflict and in_batch.get():
            # A lock held by another batch, which may wait for this one: not the attempt's
            # doing. The job goes back to the queue unrecorded (durable.worker).
            raise Deferred(f"{what} waited too long for a lock inside a batch") from exc
        return Err(exc)
    finally:
        current_run.reset(token)
