"""Typed data: dataclasses and pydantic models to and from the JSON durable stores (pure).

A `Codec` is built once, when a workflow is defined, from a type annotation that contains
a dataclass or a pydantic model (`codec_for`): a workflow's `input=` model, a handler's
return annotation. Other annotations need none: their values are stored as they are.

Pydantic is optional. An annotation that contains a pydantic model anywhere is converted
by pydantic itself (a `TypeAdapter`: its validation, its coercions, its JSON mode), and
pydantic is imported only when such a model is seen. Annotations made of dataclasses and
JSON types are converted by `durable.convert`, strictly, for what JSON can carry: `str`,
`int`, `float`, `bool`, `None`, `Any`, `list`/`tuple`/`set` of them, `dict[str, ...]`, unions and
`Optional`, `Literal`, enums, `datetime`/`date` (ISO 8601), `UUID` and `Decimal` (strings),
nested dataclasses. Unknown keys of a JSON object are ignored (a stored value keeps
decoding after a field is removed); a missing field without a default, or a value of the
wrong type, is refused with a `SerializationError` that names the field by its path
(`items.0.qty`), as pydantic's errors do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
import typing
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from durable.convert import _build, _field, _Invalid, _name
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


# -- dataclasses (their converters: durable.convert) ---------------------------------------


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
