"""A small name -> factory registry (timm's ``register_model`` idea, one instance per kind of part).

Every built-in entry is registered when ``hybrid_reid`` is imported (the package imports each module
that registers), so lookups never depend on the caller having imported the right file first.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, List, Tuple, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes or factories.

    Example:
        >>> FUSIONS = Registry("fusion")
        >>> @FUSIONS.register("sum")
        ... class SumFusion: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered by {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}.{hint}")
        return self._entries[name]

    def names(self) -> List[str]:
        return sorted(self._entries)

    def entries(self) -> List[Tuple[str, T]]:
        """``(name, entry)`` in registration order."""
        return list(self._entries.items())

    def __contains__(self, name: str) -> bool:
        return name in self._entries
