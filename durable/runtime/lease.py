"""`transactional=False` steps: the attempt runs outside any transaction, under a lease on
the run's job that a heartbeat extends; the lease holder settles it in a new transaction.
If the worker dies, the lease lapses and the next claimer records the attempt as lost."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import anyio
import asyncpg

from durable.db import Connection, is_connection_error
from durable.runtime.transition import Err, Outcome, RunState
from durable.workflow import Step

log = logging.getLogger("durable.runtime")

#: Settles a finished leased attempt: given its outcome, in a transaction of its own.
Settle = Callable[[Outcome], Awaitable[None]]


async def run_leased(
    pool: asyncpg.Pool,
    extend: Callable[[Connection, float], Awaitable[bool]],
    state: RunState,
    step: Step,
    attempt: Callable[[], Awaitable[Outcome]],
    settle: Settle,
    lease_seconds: float,
) -> None:
    """Run `attempt` while a heartbeat keeps the lease (`extend` pushes it), then `settle`.

    A lease that could not be extended is lost: another worker retries the step, so this
    outcome is dropped. A settle that loses its connection is tried again while the lease
    is ours (the lease token makes a second commit impossible).
    """
    outcome: Outcome | None = None
    lost = False

    async def heartbeat(scope: anyio.CancelScope) -> None:
        nonlocal lost
        while True:
            await anyio.sleep(lease_seconds / 3)
            with contextlib.suppress(Exception):
                async with pool.acquire() as c:
                    if not await extend(c, lease_seconds):
                        lost = True
                        scope.cancel()
                        return

    fields = {"run_id": state.run_id, "node": step.name, "attempt": state.attempt}
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat, tg.cancel_scope)
        outcome = await attempt()
        tg.cancel_scope.cancel()
    if lost or outcome is None:
        log.warning(
            "run %s: the lease of step %s was lost; another worker retries it",
            state.run_id,
            step.name,
            extra=fields,
        )
        return
    if isinstance(outcome, Err):
        log.debug("leased attempt failed: %r", outcome.error, extra=fields)
    deadline = anyio.current_time() + lease_seconds
    while True:
        try:
            await settle(outcome)
            return
        except Exception as exc:
            if not is_connection_error(exc) or anyio.current_time() > deadline:
                raise
            log.warning(
                "run %s: settling step %s lost its connection, retrying: %s",
                state.run_id,
                step.name,
                exc,
                extra=fields,
            )
            await anyio.sleep(0.2)
