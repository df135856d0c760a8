"""Typed data: dataclasses and pydantic models to and from the JSON durable stores (pure).

A `Codec` is built once, when a workflow is defined, from a type annotation that contains
a dataclass or a pydantic model (`codec_for`): a workflow's `input=` model, a handler's
return annotation. Other annotations need none: their values are stored as they are.

Pydantic is optional. An annotation that contains a pydantic model anywhere is converted
by pydantic itself (a `TypeAdapter`: its validation, its coercions, its JSON mode), and
pydantic is imported only when such a model is seen. Annotations made of dataclasses and
JSON types are converted here, strictly, for what JSON can carry: `str`, `int`, `float`,
`bool`, `None`, `Any`, `list`/`tuple`/`set` of them, `dict[str, ...]`, unions and
`Optional`, `Literal`, enums, `datetime`/`date` (ISO 8601), `UUID` and `Decimal` (strings),
nested dataclasses. Unknown keys of a JSON object are ignored (a stored value keeps
decoding after a field is removed); a missing field without a default, or a value of the
wrong type, is refused with a `SerializationError` that names the field by its path
(`items.0.qty`), as pydantic's errors do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import inspect
import sys
import types
import typing
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from durable.db import dumps
from durable.errors import ArgumentTypeError, DefinitionError, SerializationError

_MAX_SHOWN = 3  # errors listed in one message; the rest are counted


class Codec:
    """Converts the values of one annotation to their JSON form (`encode`) and back
    (`decode`); both raise `SerializationError` naming the field at fault."""

    def __init__(self, annotation: Any) -> None:
        self.annotation = annotation

    def decode(self, data: Any, what: str) -> Any:
        """The typed value of JSON `data` (validated)."""
        raise NotImplementedError

    def encode(self, value: Any, what: str) -> Any:
        """The JSON form of `value`: an instance, or data the annotation accepts (validated)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_name(self.annotation)})"


def codec_for(annotation: Any, what: str) -> Codec | None:
    """The codec of `annotation`, or None when it holds no dataclass or pydantic model.

    Raises `DefinitionError` when a dataclass in it has a field durable cannot convert.
    """
    if annotation is None or annotation is Any:
        return None
    if _contains(annotation, _is_pydantic, set()):
        return _PydanticCodec(annotation, what)
    if _contains(annotation, dataclasses.is_dataclass, set()):
        return _DataclassCodec(annotation, what)
    return None


def model_codec(model: Any, what: str) -> Codec:
    """The codec of a workflow's `input=` model: a dataclass or a pydantic model class."""
    if not isinstance(model, type) or not (dataclasses.is_dataclass(model) or _is_pydantic(model)):
        raise DefinitionError(
            f"{what}: input must be a dataclass or a pydantic model class, got {model!r}"
        )
    codec = codec_for(model, what)
    assert codec is not None
    return codec


def returns(fn: Callable[..., Any], what: str) -> Codec | None:
    """The codec of `fn`'s return annotation (None without one, or for plain JSON types).

    Only the return annotation is evaluated (a parameter annotation naming something
    imported under `TYPE_CHECKING` must not matter); one that cannot be evaluated when
    the workflow is defined is ignored, and the result is stored as it is. Remembered per
    function: the workflow definition computes it, every attempt reads it.
    """
    try:
        return _RETURNS[fn]
    except (KeyError, TypeError):  # not yet known, or not weakly referable / hashable
        pass
    codec = _return_codec(fn, what)
    with contextlib.suppress(TypeError):
        _RETURNS[fn] = codec
    return codec


_RETURNS: weakref.WeakKeyDictionary[Any, Codec | None] = weakref.WeakKeyDictionary()


def _return_codec(fn: Callable[..., Any], what: str) -> Codec | None:
    target: Any = inspect.unwrap(fn)
    while isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = getattr(type(target), "__call__", None)  # noqa: B004 - a callable object
    raw = getattr(target, "__annotations__", {}).get("return")
    module = sys.modules.get(getattr(target, "__module__", ""), None)
    namespace = getattr(target, "__globals__", None) or getattr(module, "__dict__", {})
    for _ in range(2):  # a quoted annotation under `from __future__ import annotations`
        if not isinstance(raw, str):
            break
        try:
            # What typing.get_type_hints does, for this one annotation.
            raw = eval(raw, namespace)
        except Exception:
            return None
    return codec_for(raw, what)


def input_text(codec: Codec | None, value: Any, what: str) -> str:
    """The JSON text a run's input is stored as; `value` is a mapping, or an instance of
    the workflow's `input=` model (whose `codec` validates it: `SerializationError` naming
    the field). None is an empty object."""
    if value is None:
        value = {}
    model = None if codec is None else codec.annotation
    if not isinstance(value, Mapping) and not (model is not None and isinstance(value, model)):
        expected = "a mapping (a JSON object)"
        if model is not None:
            expected = f"a {_name(model)} or {expected}"
        raise ArgumentTypeError(
            f"input must be {expected}, got {type(value).__name__} "
            f"(for {what.removeprefix('input of ')})"
        )
    data = dict(value) if codec is None else codec.encode(value, what)
    return dumps(data, what)


def encoded(codec: Codec | None, value: Any, what: str) -> Any:
    """`value` in the form JSON stores: through `codec` when there is one."""
    return value if codec is None else codec.encode(value, what)


# -- pydantic ------------------------------------------------------------------------------


def _is_pydantic(tp: Any) -> bool:
    # Models and pydantic dataclasses carry a validator; no import of pydantic needed.
    return isinstance(tp, type) and hasattr(tp, "__pydantic_validator__")


class _PydanticCodec(Codec):
    def __init__(self, annotation: Any, what: str) -> None:
        super().__init__(annotation)
        import pydantic
        import pydantic_core

        try:
            self._adapter: Any = pydantic.TypeAdapter(annotation)
        except pydantic.PydanticUserError as exc:
            raise DefinitionError(
                f"{what}: pydantic cannot use {_name(annotation)}: {exc}"
            ) from None
        self._errors: Any = (pydantic.ValidationError, pydantic_core.PydanticSerializationError)

    def decode(self, data: Any, what: str) -> Any:
        try:
            return self._adapter.validate_python(data)
        except self._errors as exc:
            raise SerializationError(_pydantic_message(exc, what)) from None

    def encode(self, value: Any, what: str) -> Any:
        try:
            return self._adapter.dump_python(self._adapter.validate_python(value), mode="json")
        except self._errors as exc:
            raise SerializationError(_pydantic_message(exc, what)) from None


def _pydantic_message(exc: Any, what: str) -> str:
    if not hasattr(exc, "errors"):  # a serialization error: no field paths
        return f"{what} is not JSON-serializable: {exc}"
    errors = exc.errors(include_url=False)
    parts = [_field(tuple(e["loc"]), e["msg"]) for e in errors[:_MAX_SHOWN]]
    if len(errors) > _MAX_SHOWN:
        parts.append(f"and {len(errors) - _MAX_SHOWN} more")
    return f"{what} is invalid: " + "; ".join(parts)


# -- dataclasses ---------------------------------------------------------------------------


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


class _DataclassCodec(Codec):
    def __init__(self, annotation: Any, what: str) -> None:
        super().__init__(annotation)
        self._conv = _build(annotation, what, {})

    def decode(self, data: Any, what: str) -> Any:
        try:
            return self._conv.load(data)
        except _Invalid as exc:
            raise SerializationError(
                f"{what} is invalid: {_field(exc.path, exc.message)}"
            ) from None

    def encode(self, value: Any, what: str) -> Any:
        try:
            return self._conv.dump(value)
        except _Invalid as exc:
            raise SerializationError(
                f"{what} is invalid: {_field(exc.path, exc.message)}"
            ) from None


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


def _contains(tp: Any, test: Callable[[Any], bool], seen: set[int]) -> bool:
    """True when `test` holds for `tp`, one of its type arguments or (for a dataclass) one
    of its fields' annotations, at any depth."""
    if id(tp) in seen:
        return False
    seen.add(id(tp))
    if isinstance(tp, type) and test(tp):
        return True
    if any(_contains(a, test, seen) for a in typing.get_args(tp)):
        return True
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        try:
            hints = typing.get_type_hints(tp, include_extras=True)
        except Exception:
            return False  # _build reports it
        return any(_contains(h, test, seen) for h in hints.values())
    return False


__all__ = ["Codec", "codec_for", "encoded", "input_text", "model_codec", "returns"]
