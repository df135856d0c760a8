"""A job's look at its run: the run state read by a claim, and the `Visit` that node
modules decide with (reads, and user code run through the attempt wrapper)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import asyncpg

from durable.codec import Codec, returns
from durable.context import Context
from durable.db import Connection
from durable.errors import SerializationError, WorkerLost
from durable.flow import Limit, wait_key
from durable.queue import Job
from durable.runtime.attempt import run_attempt
from durable.runtime.threads import Threads, invoke
from durable.runtime.transition import Child, Err, Outcome, RunState, Signal
from durable.sql import Queries
from durable.stepconn import StepConnection
from durable.workflow import Loop, Node, Parallel, Route, Step, Workflow

#: Turns a node's stored result (JSON) into what `ctx.results` shows (typed results).
Decoder = Callable[[Any], Any]


@dataclass
class Shared:
    """What every visit of one worker's runner reads: its queries, limits and workflows,
    the threads plain `def` user code runs on, the engine's named limits, and the memo of
    loops' committed iterations."""

    q: Queries
    transaction_timeout: float | None
    max_claims: int
    by_name: Mapping[str, Workflow]
    pool: asyncpg.Pool
    threads: Threads = field(default_factory=Threads)
    limits: Mapping[str, Limit] = field(default_factory=dict)
    # (run, loop node, epoch) -> results of its committed iterations, so that an
    # iteration costs O(1), not a read of every earlier one.
    iterations: dict[tuple[str, str, int], list[Any]] = field(default_factory=dict)
    # workflow queue -> node name -> how `ctx.results` shows that node's typed result
    decoders: dict[str, dict[str, Decoder]] = field(default_factory=dict)

    def decoders_of(self, wf: Workflow) -> dict[str, Decoder]:
        """The decoders of `wf`'s nodes whose handlers return dataclasses or models."""
        found = self.decoders.get(wf.queue)
        if found is None:
            found = {}
            for node in wf.nodes:
                decoder = _decoder(node)
                if decoder is not None:
                    found[node.name] = decoder
            self.decoders[wf.queue] = found
        return found


def _decoder(node: Node) -> Decoder | None:
    """How `ctx.results` shows `node`'s result when a handler of it has a typed return: a
    step's value, a parallel node's branch values, a route's branch value, a loop's
    iteration values (None when nothing is typed)."""
    what = f"result of {node.kind} {node.name!r}"
    if isinstance(node, Step):
        step = returns(node.fn, what)
        return None if step is None else lambda value: step.decode(value, what)
    if isinstance(node, Loop):
        body = returns(node.body, what)
        return None if body is None else lambda value: [body.decode(v, what) for v in value]
    if isinstance(node, Parallel | Route):
        typed = {k: c for k, fn in node.branches.items() if (c := returns(fn, what)) is not None}
        if not typed:
            return None
        if isinstance(node, Parallel):
            return lambda value: {
                k: typed[k].decode(v, f"{what} branch {k!r}") if k in typed else v
                for k, v in value.items()
            }

        def route(value: Any) -> Any:
            codec = typed.get(value.get("branch"))
            if codec is None:
                return value
            return {**value, "result": codec.decode(value["result"], what)}

        return route
    return None


def state_from_row(row: asyncpg.Record, results: Mapping[str, Any] | None = None) -> RunState:
    """The run state a claim read; `results` when the worker already knows them."""
    branches = row["branches"]
    return RunState(
        job_id=row["id"],
        task=row["task"],
        branch=row["branch"],
        run_id=row["run_id"],
        lease_token=row["lease_token"],
        workflow=row["workflow"],
        status=row["status"],
        input=row["input"],
        cursor=row["cursor"],
        current_node=row["current_node"],
        iteration=row["iteration"],
        attempt=row["attempt"],
        epoch=row["epoch"],
        wake_at=row["wake_at"],
        waiting_for=row["waiting_for"],
        child_id=row["child_id"],
        branches=None if branches is None else tuple(branches),
        error=row["error"],
        parent_id=row["parent_id"],
        ending=row["ending"],
        now=row["now"],
        results=results if results is not None else json.loads(row["results"] or "{}"),
        replay=row["replay"],
        cancel=row["cancel"],
    )


def job_from_row(
    row: asyncpg.Record | None, results: Mapping[str, Any] | None = None
) -> Job | None:
    if row is None:
        return None
    return Job(
        id=row["id"],
        queue=row["queue"],
        task=row["task"],
        run_id=row["run_id"],
        payload={"suspicious": row["suspicious"]},
        priority=0,
        attempts=0,
        lease_token=row["lease_token"],
        prefetched=state_from_row(row, results),
    )


class _Results(Mapping[str, Any]):
    """`ctx.results`: read-only, and a list or dict is copied when read, so what a handler
    does to a value it read changes nothing that a later node (or this worker) sees. A
    typed result is decoded at each read, so it is a fresh instance too."""

    __slots__ = ("_data", "_decoders")

    def __init__(self, data: Mapping[str, Any], decoders: Mapping[str, Decoder]) -> None:
        self._data = data
        self._decoders = decoders

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        if isinstance(value, list | dict):
            value = copy.deepcopy(value)
        decoder = self._decoders.get(key)
        return value if decoder is None or value is None else decoder(value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"results({dict(self._data)!r})"


class JobVisit:
    """One job's look at its run: the `Visit` a node module decides with."""

    def __init__(
        self, shared: Shared, conn: Connection, state: RunState, wf: Workflow, lost: bool
    ) -> None:
        self.runner = shared
        self.conn = conn
        self.state = state
        self.wf = wf
        self.lost = lost
        self.conns: list[StepConnection] = []
        # The stored input does not fit the workflow's `input=` model (it changed since the
        # run started): raised as the failure of every attempt of user code.
        self.bad_input: SerializationError | None = None
        #: The limit slot set (name and key) this attempt took a slot of, if any: its end
        #: wakes the next run waiting for one.
        self.holds: str | None = None
        #: Seconds spent in user code (what a batch's window counts).
        self.busy = 0.0

    def context(self, node: str, *, results: Mapping[str, Any] | None = None) -> Context[Any]:
        conn = StepConnection(self.conn)
        self.conns.append(conn)
        return self._context(node, cast(Connection, conn), results)

    def detached_context(self, node: str) -> Context[Any]:
        """A context without a connection (a `transactional=False` step)."""
        return self._context(node, None, None)

    def _context(
        self, node: str, conn: Connection | None, results: Mapping[str, Any] | None
    ) -> Context[Any]:
        s = self.state
        # Parsed for each context: what one handler does to it no other sees.
        data = json.loads(s.input)
        codec = self.wf.input_codec
        if codec is not None:
            try:
                data = codec.decode(data, f"stored input of run {s.run_id}")
            except SerializationError as exc:
                self.bad_input = exc
        return Context(
            input=data,
            results=_Results(
                s.results if results is None else results, self.runner.decoders_of(self.wf)
            ),
            run_id=s.run_id,
            workflow=s.workflow,
            node=node,
            attempt=s.attempt,
            conn=conn,
        )

    async def call(
        self,
        what: str,
        ctx: Context[Any],
        call: Callable[[], Awaitable[Any]],
        *,
        timeout: float | None = None,
        store: bool = True,
        returns: Codec | None = None,
    ) -> Outcome:
        if self.lost:
            return Err(
                WorkerLost(
                    f"workers died {self.runner.max_claims} times in a row running attempt "
                    f"{ctx.attempt} of {what} (killed, out of memory, or crashed)"
                )
            )
        began = time.monotonic()
        try:
            return await run_attempt(
                ctx,
                what,
                call,
                timeout=timeout,
                transaction_timeout=self.runner.transaction_timeout,
                store=store,
                returns=returns,
            )
        finally:
            self.busy += time.monotonic() - began

    async def invoke(self, fn: Callable[..., Any], ctx: Context[Any], *args: Any) -> Any:
        """Call user function `fn` with `ctx`: awaited if `async def`, else on a thread."""
        if self.bad_input is not None:
            raise self.bad_input
        return await invoke(self.runner.threads, fn, ctx, *args)

    async def journal(self, key: str) -> str | None:
        text: str | None = await self.conn.fetchval(
            self.runner.q["journal_value"], self.state.run_id, key
        )
        return text

    async def sub_results(self, node: str) -> dict[str, str]:
        rows = await self.conn.fetch(self.runner.q["sub_results"], self.state.run_id, node)
        return {r["key"].split("#", 1)[1]: r["result"] for r in rows}

    async def iterations(self, node: str) -> list[Any]:
        s = self.state
        key = (s.run_id, node, s.epoch)
        memo = self.runner.iterations.get(key)
        if memo is not None and len(memo) == s.iteration:
            return memo  # committed iterations do not change within an epoch
        done = await self.sub_results(node)
        memo = [json.loads(done[str(k)]) for k in range(s.iteration) if str(k) in done]
        if len(self.runner.iterations) > 1_000:
            self.runner.iterations.clear()
        self.runner.iterations[key] = memo
        return memo

    async def oldest_signal(self, name: str) -> Signal | None:
        row = await self.conn.fetchrow(self.runner.q["oldest_signal"], self.state.run_id, name)
        return None if row is None else Signal(row["id"], row["payload"])

    async def child(self, run_id: str) -> Child | None:
        row = await self.conn.fetchrow(self.runner.q["child_state"], run_id)
        return None if row is None else Child(row["status"], row["result"], row["error"])

    def workflow(self, name: str) -> Workflow | None:
        return self.runner.by_name.get(name)

    async def acquire(self, limit: str, key: str, lease: Any = None) -> datetime | None:
        spec = self.runner.limits[limit]
        s = self.state
        q = self.runner.q
        row: Any = None
        for _ in range(3):
            row = await self.conn.fetchrow(
                q["limit_acquire"],
                s.run_id,
                limit,
                key,
                spec.concurrency,
                spec.rate,
                spec.per,
                s.job_id,
                lease,
            )
            assert row is not None
            if row["grow"] is None:
                break
            # The key's rows are added in a transaction of their own: rows this attempt's
            # transaction added would exist for no other attempt until it commits.
            n = spec.concurrency if row["grow"] == "slot" else spec.rate
            async with self.runner.pool.acquire() as c:
                await c.execute(q["limit_grow"], limit, key, row["grow"], n)
        wake_at: datetime | None = row["wake_at"]
        if row["grow"] is not None:  # others keep adding rows as fast: look again soon
            wake_at = s.now + timedelta(milliseconds=50)
        elif wake_at is None and spec.concurrency is not None:
            self.holds = wait_key(limit, key)
        return wake_at
