"""A small name -> builder registry shared by backbones, heads, datasets (and later objectives
and policies). A decorator registers, ``get`` looks up, ``names`` lists; a duplicate name is an
error so that two plugins can never silently shadow each other."""
from __future__ import annotations

import difflib
import inspect
import numbers
import os
import re
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        msg = f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
        text = str(name)
        close = difflib.get_close_matches(text, self.names(), n=3)
        close.sort(key=lambda c: -len(os.path.commonprefix([c, text])))  # resnet21: resnet20 before resnet32
        return msg + (f" (did you mean {' or '.join(map(repr, close[:2]))}?)" if close else "")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def is_whole(v: Any, least: int | None = None) -> bool:
    """``v`` is an integer (Python's or NumPy's; not a bool), and at least ``least`` when given."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and (least is None or v >= least)


class OptionTypeError(TypeError, ValueError):
    """An option of the wrong type: a TypeError, and a ValueError for callers that report bad
    options as such (the CLI)."""


def check_options(what: str, fn: Callable, options: dict, skip: tuple[str, ...] = ()) -> None:
    """Refuse keyword options that ``fn`` does not take, naming them and listing the valid ones
    (instead of a bare ``TypeError`` from deep inside a builder)."""
    params = inspect.signature(fn).parameters
    missing = [n for n, p in params.items() if n not in skip and p.default is p.empty
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in options]
    if missing:
        raise ValueError(f"{what} needs option(s) {', '.join(map(repr, missing))}")
    accepted = [p for p in params if p not in skip]
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(
            f"{what} does not accept option(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )
    for key, value in options.items():
        if key in accepted:
            _check_type(what, key, params[key], value)


# The option types checked: a parameter annotated with these (``int | None``, ``Sequence[int]``,
# ...), or unannotated with a default of one of them. Other annotations are the builder's business.
_SCALARS: dict[str, Callable[[Any], bool]] = {
    "int": is_whole,
    "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
}
_NOUN = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string", "None": "None"}
_PLURAL = {"int": "ints", "float": "numbers", "bool": "booleans", "str": "strings", "None": "Nones"}
_SEQ = re.compile(r"^(?:typing\.)?(?:Sequence|list|tuple)\[(\w+)(?:, \.\.\.)?\]$")


def _annotation_kinds(param: inspect.Parameter) -> list[str] | None:
    """``["int", "None"]``, ``["seq:int"]``, ...; None when the annotation is not one checked here."""
    ann = param.annotation
    if ann is param.empty:
        d = param.default
        return [type(d).__name__] if type(d) in (int, float, bool, str) else None
    if isinstance(ann, type):
        ann = "None" if ann is type(None) else ann.__name__
    elif not isinstance(ann, str):  # a typing object (no ``from __future__ import annotations``)
        ann = str(ann).replace("typing.", "").replace("NoneType", "None")
    kinds = []
    for part in (p.strip() for p in re.split(r"\|(?![^\[]*\])", ann)):
        if part.startswith("Optional[") and part.endswith("]"):
            part, kinds = part[9:-1], kinds + ["None"]
        seq = _SEQ.match(part)
        if part in _SCALARS:
            kinds.append(part)
        elif seq and seq.group(1) in _SCALARS:
            kinds.append("seq:" + seq.group(1))
        else:
            return None
    return kinds


def _check_type(what: str, key: str, param: inspect.Parameter, value: Any) -> None:
    kinds = _annotation_kinds(param)
    if kinds is None or not isinstance(value, (numbers.Number, str, list, tuple, dict, type(None))):
        return  # other objects (tensors, arrays) are the builder's to judge
    for k in kinds:
        if k.startswith("seq:"):
            if isinstance(value, (list, tuple)) and all(_SCALARS[k[4:]](v) for v in value):
                return
        elif _SCALARS[k](value):
            return
    allowed = " or ".join(f"a list of {_PLURAL[k[4:]]}" if k.startswith("seq:") else _NOUN[k] for k in kinds)
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    raise OptionTypeError(f"{what}: option {key!r} must be {allowed}, got {text} ({type(value).__name__})")
