"""Dataclasses and JSON types to and from JSON data, strictly, for `durable.codec` (pure)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from durable.errors import DefinitionError


class _Invalid(Exception):
    """A value that does not fit: `path` leads to it from the top."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def under(self, step: str | int) -> _Invalid:
        return _Invalid(self.message, (step, *self.path))


class _Conv:
    """Loads one annotation's values from JSON data and dumps them to it."""

    def load(self, value: Any) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        raise NotImplementedError


def _load(conv: _Conv, value: Any) -> Any:
    return conv.load(value)


def _dump(conv: _Conv, value: Any) -> Any:
    return conv.dump(value)


def _field(path: tuple[Any, ...], message: str) -> str:
    if not path:
        return message
    return f"field {'.'.join(str(p) for p in path)!r}: {message}"


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"got {type(value).__name__} {text}"


def _name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    return getattr(tp, "__qualname__", None) or repr(tp)


class _Anything(_Conv):
    def load(self, value: Any) -> Any:
        return value

    def dump(self, value: Any) -> Any:
        return value


class _Exact(_Conv):
    """str, bool, None: the JSON value is the Python value."""

    def __init__(self, tp: type) -> None:
        self.tp = tp

    def _check(self, value: Any) -> Any:
        fits = isinstance(value, str) if self.tp is str else type(value) is self.tp
        if not fits:
            raise _Invalid(f"expected {_name(self.tp)}, {_got(value)}")
        return value

    load = dump = _check


class _Int(_Conv):
    def _check(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected int, {_got(value)}")
        return int(value)

    load = dump = _check


class _Float(_Conv):
    def _check(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"expected float, {_got(value)}")
        return float(value)

    load = dump = _check


class _Text(_Conv):
    """A value stored as a string: datetime, date, UUID, Decimal."""

    def __init__(self, tp: type, parse: Callable[[str], Any], show: Callable[[Any], str]) -> None:
        self.tp = tp
        self.parse = parse
        self.show = show

    def load(self, value: Any) -> Any:
        if isinstance(value, self.tp) and not (
            self.tp is dt.date and isinstance(value, dt.datetime)
        ):
            return value
        if self.tp is Decimal and isinstance(value, int) and not isinstance(value, bool):
            return Decimal(value)
        if not isinstance(value, str):
            raise _Invalid(f"expected {_name(self.tp)} as a string, {_got(value)}")
        try:
            return self.parse(value)
        except (ValueError, InvalidOperation):
            raise _Invalid(f"expected {_name(self.tp)}, got {value!r}") from None

    def dump(self, value: Any) -> Any:
        return self.show(self.load(value))


def _aware_or_naive(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _date(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


_TEXT: dict[Any, _Text] = {
    dt.datetime: _Text(dt.datetime, _aware_or_naive, lambda v: v.isoformat()),
    dt.date: _Text(dt.date, _date, lambda v: v.isoformat()),
    uuid.UUID: _Text(uuid.UUID, uuid.UUID, str),
    Decimal: _Text(Decimal, Decimal, str),
}


class _Enum(_Conv):
    def __init__(self, tp: type[enum.Enum]) -> None:
        self.tp = tp

    def load(self, value: Any) -> Any:
        if isinstance(value, self.tp):
            return value
        try:
            return self.tp(value)
        except (ValueError, TypeError):
            known = ", ".join(repr(m.value) for m in self.tp)
            raise _Invalid(f"expected one of {known}, got {value!r}") from None

    def dump(self, value: Any) -> Any:
        return self.load(value).value


class _Literal(_Conv):
    def __init__(self, values: tuple[Any, ...]) -> None:
        self.values = values

    def _check(self, value: Any) -> Any:
        for allowed in self.values:
            if type(value) is type(allowed) and value == allowed:
                return value
        raise _Invalid(f"expected one of {', '.join(map(repr, self.values))}, got {value!r}")

    load = dump = _check


class _List(_Conv):
    def __init__(self, item: _Conv, make: Callable[[list[Any]], Any], name: str) -> None:
        self.item = item
        self.make = make
        self.name = name

    def _each(self, value: Any, fn: Callable[[_Conv, Any], Any]) -> list[Any]:
        if isinstance(value, str | bytes | Mapping) or not isinstance(
            value, Sequence | set | frozenset
        ):
            raise _Invalid(f"expected {self.name}, {_got(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(fn(self.item, item))
            except _Invalid as exc:
                raise exc.under(i) from None
        return out

    def load(self, value: Any) -> Any:
        return self.make(self._each(value, _load))

    def dump(self, value: Any) -> Any:
        return self._each(value, _dump)


class _Tuple(_Conv):
    def __init__(self, items: list[_Conv]) -> None:
        self.items = items

    def _each(self, value: Any, fn: Callable[[_Conv, Any], Any]) -> list[Any]:
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
            raise _Invalid(f"expected an array, {_got(value)}")
        if len(value) != len(self.items):
            raise _Invalid(f"expected {len(self.items)} items, got {len(value)}")
        out = []
        for i, (conv, item) in enumerate(zip(self.items, value, strict=True)):
            try:
                out.append(fn(conv, item))
            except _Invalid as exc:
                raise exc.under(i) from None
        return out

    def load(self, value: Any) -> Any:
        return tuple(self._each(value, _load))

    def dump(self, value: Any) -> Any:
        return self._each(value, _dump)


class _Dict(_Conv):
    def __init__(self, value: _Conv) -> None:
        self.value = value

    def _each(self, data: Any, fn: Callable[[_Conv, Any], Any]) -> dict[str, Any]:
        if not isinstance(data, Mapping):
            raise _Invalid(f"expected an object, {_got(data)}")
        out = {}
        for key, item in data.items():
            if not isinstance(key, str):
                raise _Invalid(f"expected string keys, got {key!r}")
            try:
                out[key] = fn(self.value, item)
            except _Invalid as exc:
                raise exc.under(key) from None
        return out

    def load(self, value: Any) -> Any:
        return self._each(value, _load)

    def dump(self, value: Any) -> Any:
        return self._each(value, _dump)


class _Union(_Conv):
    def __init__(self, options: list[tuple[Any, _Conv]]) -> None:
        self.options = options

    def _first(self, value: Any, fn: Callable[[_Conv, Any], Any]) -> Any:
        # None first (Optional), then the member whose class the value is an instance of
        # (so a dataclass instance is dumped as itself), then each member in order.
        if value is None and any(tp is type(None) for tp, _ in self.options):
            return None
        for tp, conv in self.options:
            if isinstance(tp, type) and tp is not type(None) and isinstance(value, tp):
                try:
                    return fn(conv, value)
                except _Invalid:
                    break
        failures = []
        for _tp, conv in self.options:
            try:
                return fn(conv, value)
            except _Invalid as exc:
                failures.append(exc)
        deepest = max(failures, key=lambda e: len(e.path))
        if deepest.path:
            raise deepest
        names = " | ".join(_name(tp) for tp, _ in self.options)
        raise _Invalid(f"expected {names}, {_got(value)}")

    def load(self, value: Any) -> Any:
        return self._first(value, _load)

    def dump(self, value: Any) -> Any:
        return self._first(value, _dump)


class _Dataclass(_Conv):
    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.fields: list[tuple[str, _Conv, bool]] = []  # filled by _build (recursion)

    def load(self, value: Any) -> Any:
        if isinstance(value, self.cls):
            value = self.dump(value)  # checked field by field, then a fresh instance
        if not isinstance(value, Mapping):
            raise _Invalid(f"expected an object for {_name(self.cls)}, {_got(value)}")
        kwargs = {}
        for name, conv, required in self.fields:
            if name not in value:
                if required:
                    raise _Invalid("missing", (name,))
                continue
            try:
                kwargs[name] = conv.load(value[name])
            except _Invalid as exc:
                raise exc.under(name) from None
        try:
            return self.cls(**kwargs)
        except Exception as exc:  # __post_init__ refusing the value
            raise _Invalid(f"{_name(self.cls)} refused the value: {exc}") from None

    def dump(self, value: Any) -> Any:
        if not isinstance(value, self.cls):
            if isinstance(value, Mapping):
                value = self.load(value)
            else:
                raise _Invalid(f"expected {_name(self.cls)} or an object, {_got(value)}")
        out = {}
        for name, conv, _required in self.fields:
            try:
                out[name] = conv.dump(getattr(value, name))
            except _Invalid as exc:
                raise exc.under(name) from None
        return out


def _build(tp: Any, what: str, seen: dict[type, _Dataclass]) -> _Conv:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _build(args[0], what, seen)
    if tp is Any or tp is object:
        return _Anything()
    if tp is None or tp is type(None):
        return _Exact(type(None))
    if tp is bool or tp is str:
        return _Exact(tp)
    if tp is int:
        return _Int()
    if tp is float:
        return _Float()
    if tp in _TEXT:
        return _TEXT[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _Enum(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, what, seen)
    if origin is typing.Literal:
        return _Literal(args)
    if origin is typing.Union or origin is types.UnionType:
        return _Union([(a, _build(a, what, seen)) for a in args])
    if tp in (list, set, frozenset, tuple) or origin in (list, set, frozenset, Sequence):
        item = _build(args[0], what, seen) if args else _Anything()
        kind = origin or tp
        make: Callable[[list[Any]], Any] = list if kind is Sequence else kind
        return _List(item, make, "an array")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _List(_build(args[0], what, seen), tuple, "an array")
        return _Tuple([_build(a, what, seen) for a in args])
    if tp is dict or origin in (dict, Mapping):
        if args and args[0] is not str:
            raise DefinitionError(f"{what}: JSON object keys are strings, not {_name(args[0])}")
        return _Dict(_build(args[1], what, seen) if args else _Anything())
    raise DefinitionError(
        f"{what}: durable cannot store {_name(tp)} as JSON in a dataclass (use JSON types, "
        "datetime, date, UUID, Decimal, enums or dataclasses, or a pydantic model)"
    )


def _dataclass(cls: type, what: str, seen: dict[type, _Dataclass]) -> _Dataclass:
    if cls in seen:  # a recursive dataclass: the converter being built
        return seen[cls]
    conv = seen[cls] = _Dataclass(cls)
    hints = _hints(cls, what)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        conv.fields.append(
            (f.name, _build(hints[f.name], f"{what}: field {f.name!r}", seen), required)
        )
    return conv


def _hints(cls: type, what: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception as exc:
        raise DefinitionError(
            f"{what}: the field annotations of {_name(cls)} cannot be resolved: {exc}"
        ) from None
