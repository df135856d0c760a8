"""Typed data (issue 16): `Workflow(input=Model)` with a dataclass or a pydantic model, and
handlers whose return annotation is one. `start()` validates before writing anything,
handlers see instances (after a restart too), `get_run()` and `wait()` give JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest
from helpers import eventually, open_engine, running_engine

import durable

TABLES = ("runs", "journal", "jobs", "signals", "attempts")


@dataclass
class Line:
    sku: str
    qty: int = 1


@dataclass
class OrderIn:
    customer: str
    lines: list[Line]
    placed: datetime
    note: str | None = None


@dataclass(frozen=True)
class Reservation:
    id: int
    skus: tuple[str, ...]


class Card(pydantic.BaseModel):
    number: str
    cents: int = pydantic.Field(gt=0)


class Charge(pydantic.BaseModel):
    charge_id: str
    cents: int


GOOD = {
    "customer": "ada",
    "lines": [{"sku": "A1", "qty": 2}, {"sku": "B2"}],
    "placed": "2024-05-01T12:00:00+00:00",
}


async def snapshot(engine: durable.Engine) -> dict[str, list[str]]:
    async with engine.pool.acquire() as conn:
        return {
            t: [
                r[0]
                for r in await conn.fetch(f"SELECT to_jsonb(x)::text FROM durable.{t} x ORDER BY 1")
            ]
            for t in TABLES
        }


def order_workflow(seen: list[Any]) -> durable.Workflow[OrderIn]:
    wf = durable.Workflow("typed_order", input=OrderIn)

    @wf.step
    async def reserve(ctx: durable.Context[OrderIn]) -> Reservation:
        seen.append(ctx.input)
        return Reservation(id=7, skus=tuple(line.sku for line in ctx.input.lines))

    wf.wait_for_signal("approval", "approved")

    @wf.step
    async def ship(ctx: durable.Context[OrderIn]) -> str:
        reservation = ctx.results["reserve"]
        seen.append(reservation)
        assert isinstance(ctx.input, OrderIn)
        assert isinstance(reservation, Reservation)
        return f"{ctx.input.customer}: {','.join(reservation.skus)}"

    return wf


async def test_a_bad_field_is_refused_naming_the_field_and_nothing_is_written(db: Any) -> None:
    dc = durable.Workflow("dc_input", input=OrderIn).step("s", lambda ctx: None)
    pd = durable.Workflow("pd_input", input=Card).step("s", lambda ctx: None)
    async with open_engine(db, dc, pd) as engine:
        await engine.start(dc, GOOD)  # a row in each table for the snapshot to compare
        before = await snapshot(engine)
        bad_line = {**GOOD, "lines": [{"sku": "A1", "qty": "two"}]}
        with pytest.raises(
            durable.SerializationError, match=r"field 'lines\.0\.qty': expected int"
        ):
            await engine.start(dc, bad_line)
        missing = {k: v for k, v in GOOD.items() if k != "placed"}
        with pytest.raises(durable.SerializationError, match=r"field 'placed': missing"):
            await engine.start("dc_input", missing)
        with pytest.raises(durable.SerializationError, match=r"field 'cents': Input should be"):
            await engine.start(pd, {"number": "4242", "cents": 0})
        with pytest.raises(durable.SerializationError, match=r"field 'number': Field required"):
            await engine.start(pd, {"cents": 5})
        # An instance is checked too: a dataclass does not check its own field types.
        wrong = OrderIn(customer="ada", lines=[Line("A1", "2")], placed=datetime.now(UTC))
        with pytest.raises(durable.SerializationError, match=r"field 'lines\.0\.qty'"):
            await engine.start(dc, wrong)
        with pytest.raises(durable.ArgumentTypeError, match="must be a OrderIn or a mapping"):
            await engine.start(dc, ["not", "an", "order"])
        assert await snapshot(engine) == before


async def test_handlers_see_instances_and_they_survive_a_restart(db: Any) -> None:
    seen: list[Any] = []
    wf = order_workflow(seen)
    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf, {**GOOD, "ignored": "unknown keys are dropped"})

        async def waiting() -> bool:
            return (await engine.get_run(run_id)).status is durable.RunStatus.WAITING

        await eventually(waiting)
        run = await engine.get_run(run_id)
    # Stored as JSON, defaults filled in, the unknown key gone.
    assert run.input == {
        "customer": "ada",
        "lines": [{"sku": "A1", "qty": 2}, {"sku": "B2", "qty": 1}],
        "placed": "2024-05-01T12:00:00+00:00",
        "note": None,
    }
    assert run.results == {"reserve": {"id": 7, "skus": ["A1", "B2"]}}
    assert seen == [
        OrderIn("ada", [Line("A1", 2), Line("B2", 1)], datetime(2024, 5, 1, 12, tzinfo=UTC))
    ]

    # A new engine and worker: nothing in memory, everything read back from the database.
    seen.clear()
    restarted = order_workflow(seen)
    async with running_engine(db, restarted) as engine:
        assert await engine.signal(run_id, "approved", {"by": "bob"})
        result = await engine.wait(run_id, timeout=10)
    assert seen == [Reservation(id=7, skus=("A1", "B2"))]
    assert result == {
        "reserve": {"id": 7, "skus": ["A1", "B2"]},
        "approval": {"by": "bob"},
        "ship": "ada: A1,B2",
    }


async def test_start_takes_an_instance_and_pydantic_models_work_end_to_end(db: Any) -> None:
    wf = durable.Workflow("pay", input=Card)

    @wf.step
    async def charge(ctx: durable.Context[Card]) -> Charge:
        return Charge(charge_id=f"ch_{ctx.input.number[-4:]}", cents=ctx.input.cents)

    @wf.step
    def receipt(ctx: durable.SyncContext[Card]) -> str:  # a plain def sees instances too
        paid = ctx.results["charge"]
        assert isinstance(paid, Charge)
        return f"{paid.charge_id} {paid.cents}"

    async with running_engine(db, wf) as engine:
        card = Card(number="4242424242424242", cents="1250")  # type: ignore[arg-type]
        run_id = await engine.start(wf, card)
        assert await engine.wait(run_id, timeout=10) == {
            "charge": {"charge_id": "ch_4242", "cents": 1250},
            "receipt": "ch_4242 1250",
        }
        assert (await engine.get_run(run_id)).input == {"number": "4242424242424242", "cents": 1250}


async def test_typed_branches_routes_loops_and_compensators(db: Any) -> None:
    wf = durable.Workflow("typed_kinds")

    async def line(ctx: durable.Context) -> Line:
        return Line(sku=ctx.node, qty=len(ctx.node))

    wf.parallel("fan", {"a": line, "bb": line})
    wf.route("pick", lambda ctx: "x", {"x": line})

    async def body(ctx: durable.LoopContext) -> Line:
        return Line(sku="it", qty=ctx.iteration)

    wf.loop("poll", lambda ctx, i: i < 2, body)

    @wf.step
    async def check(ctx: durable.Context) -> list[str]:
        fan, pick, poll = ctx.results["fan"], ctx.results["pick"], ctx.results["poll"]
        assert fan == {"a": Line("fan#a", 5), "bb": Line("fan#bb", 6)}
        assert pick == {"branch": "x", "result": Line("pick", 4)}
        assert poll == [Line("it", 0), Line("it", 1)]
        return ["checked"]

    async with running_engine(db, wf) as engine:
        result = await engine.wait(await engine.start(wf), timeout=15)
    assert result["fan"] == {"a": {"sku": "fan#a", "qty": 5}, "bb": {"sku": "fan#bb", "qty": 6}}
    assert result["poll"] == [{"sku": "it", "qty": 0}, {"sku": "it", "qty": 1}]
    assert result["check"] == ["checked"]


async def test_a_result_that_does_not_fit_its_annotation_fails_the_node_at_once(
    db: Any,
) -> None:
    wf = durable.Workflow("bad_result")

    @wf.step(max_attempts=3)
    async def reserve(ctx: durable.Context) -> Reservation:
        return {"id": "seven", "skus": []}  # type: ignore[return-value]

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf)
        with pytest.raises(durable.RunFailed) as failed:
            await engine.wait(run_id, timeout=10)
    assert failed.value.run.error == (
        "SerializationError: result of step 'reserve' is invalid: field 'id': expected int, "
        "got str 'seven'"
    )


async def test_a_child_workflows_typed_input_is_validated_when_the_parent_starts_it(
    db: Any,
) -> None:
    child = durable.Workflow("typed_child", input=Line)

    @child.step
    async def count(ctx: durable.Context[Line]) -> int:
        return ctx.input.qty * 10

    parent = durable.Workflow("typed_parent")
    parent.child_workflow("good", lambda ctx: ("typed_child", Line("A1", 3)))
    parent.child_workflow("bad", lambda ctx: ("typed_child", {"sku": 1}))
    async with running_engine(db, parent, child) as engine:
        run_id = await engine.start(parent)
        with pytest.raises(durable.RunFailed) as failed:
            await engine.wait(run_id, timeout=15)
    run = failed.value.run
    assert run.results == {"good": {"count": 30}}
    assert run.error == (
        "SerializationError: input of child workflow 'typed_child' is invalid: field 'sku': "
        "expected str, got int 1"
    )


async def test_a_stored_input_the_model_no_longer_fits_fails_the_attempt_not_the_worker(
    db: Any,
) -> None:
    @dataclass
    class Before:
        sku: str

    @dataclass
    class After:
        sku: str
        qty: int  # added without a default after runs started

    old = durable.Workflow("evolving", input=Before)
    old.step("use", lambda ctx: ctx.input.sku)
    async with open_engine(db, old) as engine:  # started by the old code, not yet run
        run_id = await engine.start(old, Before("A1"))
    new = durable.Workflow("evolving", input=After)
    new.step("use", lambda ctx: ctx.input.sku, max_attempts=3)
    assert new.queue == old.queue  # same shape: the new code serves the run
    async with running_engine(db, new) as engine:
        with pytest.raises(durable.RunFailed) as failed:
            await engine.wait(run_id, timeout=10)
        run = await engine.get_run(run_id, journal=True)
    assert failed.value.run.error == (
        f"SerializationError: stored input of run {run_id} is invalid: field 'qty': missing"
    )
    assert [a.attempt for a in run.attempts] == [1]  # not retried: the data will not change


def test_an_input_that_is_not_a_model_class_is_refused() -> None:
    with pytest.raises(durable.DefinitionError, match="dataclass or a pydantic model class"):
        durable.Workflow("w", input=dict)  # type: ignore[arg-type]
    with pytest.raises(durable.DefinitionError, match="dataclass or a pydantic model class"):
        durable.Workflow("w", input=Line("a"))  # type: ignore[arg-type]

    @dataclass
    class Opaque:
        thing: object = field(default_factory=object)
        when: complex = 0j

    with pytest.raises(durable.DefinitionError, match="field 'when': durable cannot store complex"):
        durable.Workflow("w", input=Opaque)
    assert dataclasses.is_dataclass(Opaque)


async def test_a_fork_with_an_edited_input_is_validated_against_the_model(db: Any) -> None:
    wf = durable.Workflow("typed_fork", input=Line)

    @wf.step(max_attempts=1)
    async def check(ctx: durable.Context[Line]) -> int:
        if ctx.input.qty > 5:
            raise durable.NonRetryable("too many")
        return ctx.input.qty

    async with running_engine(db, wf) as engine:
        run_id = await engine.start(wf, Line("A1", 9))
        with pytest.raises(durable.RunFailed):
            await engine.wait(run_id, timeout=10)
        with pytest.raises(durable.SerializationError, match=r"fork of run .* field 'qty'"):
            await engine.fork(run_id, input={"sku": "A1", "qty": "three"})
        fork_id = await engine.fork(run_id, input=Line("A1", 2))
        assert await engine.wait(fork_id, timeout=10) == {"check": 2}
        assert (await engine.get_run(fork_id)).input == {"sku": "A1", "qty": 2}
