"""Typed data without a database (durable/codec.py): dataclasses converted strictly for
what JSON carries, pydantic models by pydantic, errors naming the field by its path, and
the return annotations of handlers."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

import pydantic
import pytest

import durable
from durable.codec import Codec, codec_for, model_codec, returns

if TYPE_CHECKING:
    from collections.abc import Mapping


class Size(enum.Enum):
    SMALL = "s"
    LARGE = "l"


@dataclass
class Line:
    sku: str
    qty: int = 1


@dataclass
class Order:
    id: uuid.UUID
    lines: list[Line]
    placed: datetime
    due: date
    total: Decimal
    size: Size
    mode: Literal["air", "ground"] = "ground"
    note: str | None = None
    tags: dict[str, int] = field(default_factory=dict)
    pair: tuple[int, str] = (0, "")
    ratio: float = 1.0
    extra: Any = None


@dataclass
class Tree:
    name: str
    children: list[Tree] = field(default_factory=list)


ORDER = {
    "id": "12345678-1234-5678-1234-567812345678",
    "lines": [{"sku": "A1", "qty": 2}, {"sku": "B2"}],
    "placed": "2024-05-01T12:00:00+00:00",
    "due": "2024-05-08",
    "total": "19.90",
    "size": "l",
}


def codec(tp: Any) -> Codec:
    found = codec_for(tp, "value")
    assert found is not None
    return found


def test_a_dataclass_round_trips_through_json_with_defaults_filled_in() -> None:
    c = model_codec(Order, "input")
    order = c.decode({**ORDER, "unknown": "dropped"}, "input")
    assert order == Order(
        id=uuid.UUID(ORDER["id"]),
        lines=[Line("A1", 2), Line("B2", 1)],
        placed=datetime(2024, 5, 1, 12, tzinfo=UTC),
        due=date(2024, 5, 8),
        total=Decimal("19.90"),
        size=Size.LARGE,
    )
    data = c.encode(order, "input")
    assert data == {
        **ORDER,
        "lines": [{"sku": "A1", "qty": 2}, {"sku": "B2", "qty": 1}],
        "mode": "ground",
        "note": None,
        "tags": {},
        "pair": [0, ""],
        "ratio": 1.0,
        "extra": None,
    }
    assert c.decode(data, "input") == order
    assert c.encode(ORDER, "input") == data  # a mapping is validated, then encoded


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lines": [{"sku": "A1", "qty": "2"}]}, "field 'lines.0.qty': expected int, got str '2'"),
        ({"lines": [{"qty": 2}]}, "field 'lines.0.sku': missing"),
        ({"lines": {"sku": "A1"}}, "field 'lines': expected an array, got dict {'sku': 'A1'}"),
        ({"placed": "yesterday"}, "field 'placed': expected datetime, got 'yesterday'"),
        ({"total": 1.5}, "field 'total': expected Decimal as a string, got float 1.5"),
        ({"size": "m"}, "field 'size': expected one of 's', 'l', got 'm'"),
        ({"mode": "sea"}, "field 'mode': expected one of 'air', 'ground', got 'sea'"),
        ({"note": 3}, "field 'note': expected str | None, got int 3"),
        ({"tags": {"a": True}}, "field 'tags.a': expected int, got bool True"),
        ({"pair": [1]}, "field 'pair': expected 2 items, got 1"),
        ({"ratio": "1"}, "field 'ratio': expected float, got str '1'"),
        ({"id": "not-a-uuid"}, "field 'id': expected UUID, got 'not-a-uuid'"),
    ],
)
def test_a_bad_field_is_named_by_its_path(change: Mapping[str, Any], message: str) -> None:
    with pytest.raises(durable.SerializationError) as raised:
        model_codec(Order, "input of workflow 'o'").decode({**ORDER, **change}, "input")
    assert str(raised.value) == f"input is invalid: {message}"


def test_an_instance_is_checked_field_by_field_when_encoded() -> None:
    c = codec(Line)
    assert c.encode(Line("A1", 3), "x") == {"sku": "A1", "qty": 3}
    with pytest.raises(durable.SerializationError, match=r"field 'qty': expected int"):
        c.encode(Line("A1", "3"), "x")  # type: ignore[arg-type]
    with pytest.raises(durable.SerializationError, match="expected Line or an object, got list"):
        c.encode([1], "x")


def test_nested_optional_recursive_and_container_annotations() -> None:
    tree = codec(Tree).decode({"name": "a", "children": [{"name": "b"}]}, "x")
    assert tree == Tree("a", [Tree("b")])
    with pytest.raises(durable.SerializationError, match=r"field 'children\.0\.name'"):
        codec(Tree).decode({"name": "a", "children": [{"name": 1}]}, "x")
    assert codec(list[Line] | None).decode(None, "x") is None
    assert codec(dict[str, Line]).decode({"k": {"sku": "z"}}, "x") == {"k": Line("z")}
    assert codec(tuple[Line, ...]).decode([{"sku": "z"}], "x") == (Line("z"),)
    assert codec(Line | Tree).decode({"name": "t"}, "x") == Tree("t")
    assert codec(Line | Tree).encode(Tree("t"), "x") == {"name": "t", "children": []}


def test_plain_json_annotations_need_no_codec() -> None:
    for tp in (None, Any, int, str, dict[str, Any], list[int], "Line"):
        assert codec_for(tp, "x") is None


class Card(pydantic.BaseModel):
    number: str
    cents: int = pydantic.Field(gt=0)
    lines: list[Line] = []


def test_pydantic_models_are_converted_by_pydantic() -> None:
    c = model_codec(Card, "input")
    card = c.decode({"number": "4242", "cents": "250", "lines": [{"sku": "A"}]}, "input")
    assert card == Card(number="4242", cents=250, lines=[Line("A")])
    assert c.encode(card, "input") == {
        "number": "4242",
        "cents": 250,
        "lines": [{"sku": "A", "qty": 1}],
    }
    with pytest.raises(durable.SerializationError) as raised:
        c.decode({"cents": 0, "lines": [{"sku": 5}]}, "input of workflow 'pay'")
    assert str(raised.value) == (
        "input of workflow 'pay' is invalid: field 'number': Field required; "
        "field 'cents': Input should be greater than 0; "
        "field 'lines.0.sku': Input should be a valid string"
    )
    # A dataclass holding a pydantic model is converted by pydantic as a whole.

    @dataclass
    class Wrapper:
        card: Card

    assert codec(Wrapper).decode({"card": {"number": "1", "cents": 1}}, "x") == Wrapper(
        Card(number="1", cents=1)
    )


def test_only_dataclasses_and_pydantic_models_are_workflow_inputs() -> None:
    for bad in (dict, Line("a"), int, list[Line]):
        with pytest.raises(durable.DefinitionError, match="dataclass or a pydantic model class"):
            model_codec(bad, "workflow 'w'")

    @dataclass
    class Opaque:
        blob: bytes

    with pytest.raises(durable.DefinitionError, match="field 'blob': durable cannot store bytes"):
        model_codec(Opaque, "workflow 'w'")

    @dataclass
    class IntKeys:
        counts: dict[int, int]

    with pytest.raises(durable.DefinitionError, match="JSON object keys are strings"):
        model_codec(IntKeys, "workflow 'w'")


async def typed_handler(ctx: NotImportedAtRuntime) -> Line:  # type: ignore[name-defined]  # noqa: F821
    return Line("a")


def quoted(ctx: durable.SyncContext) -> list[Line] | None:
    return None


class Handler:
    def __call__(self, ctx: durable.SyncContext) -> Tree:
        return Tree("t")


def test_the_return_annotation_alone_is_evaluated_and_remembered() -> None:
    found = returns(typed_handler, "x")
    assert found is not None
    assert found.annotation is Line
    assert returns(typed_handler, "x") is found  # remembered per function
    quoted_codec = returns(quoted, "x")
    assert quoted_codec is not None
    assert quoted_codec.annotation == (list[Line] | None)
    handler_codec = returns(Handler(), "x")
    assert handler_codec is not None
    assert handler_codec.annotation is Tree
    assert returns(lambda ctx: Line("a"), "x") is None  # no annotation: stored as it is
