"""Typed, small registries: the objects the ``reuse_register_*`` hooks fill.

One registry per kind (backbone, strategy, dataset). Each entry remembers the plugin that added it,
so a name taken twice is reported with both plugins, and ``reuse backbones`` can say where a name
comes from. An unknown name is answered with the close matches.
"""
from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def plural(kind: str) -> str:
    """The plural of a registry's kind: "backbones", "strategies", "datasets"."""
    return kind[:-1] + "ies" if kind.endswith("y") else kind + "s"


class RegistryError(Exception):
    """Base of the registry errors."""


class NameTakenError(RegistryError):
    """A name is added twice; names both plugins."""

    def __init__(self, kind: str, name: str, existing_plugin: str, new_plugin: str):
        self.kind, self.name = kind, name
        self.existing_plugin, self.new_plugin = existing_plugin, new_plugin
        super().__init__(
            f"{kind} {name!r} from plugin {new_plugin!r} is already registered by plugin {existing_plugin!r}; "
            f"the first registration is kept"
        )


class UnknownNameError(RegistryError, KeyError):
    """A name nobody registered; the message lists the close matches."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name = kind, name
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        kinds = plural(kind)
        self.message = f"unknown {kind} {name!r}{hint} ({len(known)} {kinds} are registered; `reuse {kinds}` lists them)"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str
    plugin: str
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Name -> object for one kind, filled by plugins through the register hooks.

    The plugin manager sets the current plugin (:meth:`adding_as`) around each plugin's hook, so
    entries record who added them; code outside a hook adds as plugin ``"<direct>"``.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._plugin = "<direct>"
        self._on_taken: Callable[[NameTakenError], None] | None = None
        self._added: list[str] | None = None

    def add(self, name: str, obj: T, *, description: str = "", **meta: Any) -> None:
        """Register ``obj`` under ``name``; raises :class:`NameTakenError` if the name exists
        (while the plugin manager loads plugins, it reports the conflict and skips this entry)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            err = NameTakenError(self.kind, name, self._entries[name].plugin, self._plugin)
            if self._on_taken is None:
                raise err
            self._on_taken(err)
            return
        self._entries[name] = Entry(name, obj, description, self._plugin, dict(meta))
        if self._added is not None:
            self._added.append(name)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> list[dict[str, Any]]:
        """One dict per entry, sorted by name: name, description, plugin and the entry's meta."""
        return [
            {"name": e.name, "description": e.description, "plugin": e.plugin, **e.meta}
            for e in (self._entries[n] for n in self.names())
        ]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<Registry {self.kind}: {len(self)} entries>"

    @contextlib.contextmanager
    def adding_as(self, plugin: str, on_taken: Callable[[NameTakenError], None] | None = None) -> Iterator[None]:
        """Entries added inside are recorded as ``plugin``'s; a taken name goes to ``on_taken``
        instead of raising. If the block raises, the entries it added are removed again, so a
        plugin that fails half-way leaves nothing behind."""
        saved = self._plugin, self._on_taken, self._added
        self._plugin, self._on_taken, self._added = plugin, on_taken, []
        added = self._added
        try:
            yield
        except BaseException:
            for name in added:
                del self._entries[name]
            raise
        finally:
            self._plugin, self._on_taken, self._added = saved
