"""A small name registry, so configurations can name readers, flow backends and methods.

Example:
    >>> READERS = Registry("dataset reader")
    >>> @READERS.register("camvid")
    ... def read_camvid(...): ...
    >>> READERS.get("camvid")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from autolabel.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind (a reader, a backend, a method...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name`` (names are unique)."""

        def decorate(obj: T) -> T:
            if name in self._items:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The object registered as ``name``; a RegistryError lists the known names."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def check(self, name: str) -> str:
        """``name`` if registered, else the RegistryError of :meth:`get` (for pydantic validators)."""
        self.get(name)
        return name

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
