"""A small name -> builder registry shared by backbones, heads, datasets (and later objectives
and policies). A decorator registers, ``get`` looks up, ``names`` lists; a duplicate name is an
error so that two plugins can never silently shadow each other."""
from __future__ import annotations

import difflib
import os
from typing import Callable, Generic, Iterator, TypeVar

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


def check_options(what: str, fn: Callable, options: dict, skip: tuple[str, ...] = ()) -> None:
    """Refuse keyword options that ``fn`` does not take, naming them and listing the valid ones
    (instead of a bare ``TypeError`` from deep inside a builder)."""
    import inspect

    params = inspect.signature(fn).parameters
    missing = [n for n, p in params.items() if n not in skip and p.default is p.empty
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in options]
    if missing:
        raise ValueError(f"{what} needs option(s) {', '.join(map(repr, missing))}")
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in skip]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"{what} does not accept option(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )
