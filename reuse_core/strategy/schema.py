"""The strategy contract: a name, a typed option schema, and a run entry point.

One schema drives the three ways to run a strategy: ``reuse run NAME --opt value`` (the options are
generated from the schema), a recipe step (``[[step]] strategy = NAME`` plus keys), and Python
(``reuse_core.run(NAME, **options)``). All three hand the raw values to :meth:`Strategy.resolve`,
so a bad option gets the same :class:`OptionError` in each.

This module imports nothing (no torch): ``reuse --help`` builds its parsers from it.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Marks an option without a default: the caller must give it.
REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()

_TYPES = (int, float, str, bool, list)


class OptionError(ValueError):
    """A strategy option is unknown, missing, of the wrong type, or out of range.

    The message names where the option came from (strategy, recipe step) and the key.
    """


@dataclass(frozen=True)
class Option:
    """One option of a strategy.

    ``type`` is ``int``, ``float``, ``str``, ``bool`` or ``list`` (a list of strings; on the command
    line, several values after the flag). Strings are converted to ``type`` (the command line gives
    strings); ``check`` gets the converted value and returns an error message, or None when fine.
    ``ref``: the value names a model (each item, for a list): an earlier recipe step, or a store ID,
    unique ID prefix or name. Recipes check these names before any step runs.
    """

    name: str
    type: type
    default: Any = REQUIRED
    help: str = ""
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    ref: bool = False

    def __post_init__(self):
        if self.type not in _TYPES:
            raise TypeError(f"option {self.name!r}: type must be one of {[t.__name__ for t in _TYPES]}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value: Any) -> Any:
        """The value as ``self.type``; raises ValueError with the reason."""
        if value is None:
            if self.default is None:
                return None
            raise ValueError("must not be empty")
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if self.type is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, Sequence) or isinstance(value, (bytes, Mapping)):
                raise ValueError(f"expected a list, got {value!r}")
            return [str(v) for v in value]
        if self.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ValueError(f"expected an integer, got {value!r}") from None
        if self.type is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError(f"expected a number, got {value!r}") from None
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": None if self.required else self.default,
            "required": self.required,
            "help": self.help,
            "choices": list(self.choices) if self.choices else None,
            "ref": self.ref,
        }


@dataclass
class StrategyResult:
    """What a run returns: its metrics and the store IDs of the models it saved (the last one is the
    run's main product, the one later recipe steps refer to). :func:`reuse_core.run` fills in
    ``run_dir``, the run directory it ran in."""

    metrics: dict = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    run_dir: str | None = None

    @property
    def model(self) -> str | None:
        return self.models[-1] if self.models else None


@dataclass(frozen=True)
class Strategy:
    """A reuse strategy: registered by a plugin's ``reuse_register_strategies(registry)``.

    ``run(context, options) -> StrategyResult`` receives the resolved options (every key of the schema
    present, converted and checked) and a run context (store, hook relay, run directory, device, ...;
    see :class:`reuse_core.strategy.RunContext`). ``examples``: command lines that work, shown by
    ``reuse run NAME --help`` (without them it shows the required options).
    """

    name: str
    description: str
    options: tuple[Option, ...]
    run: Callable[[Any, dict], StrategyResult]
    examples: tuple[str, ...] = ()

    def __post_init__(self):
        names = [o.name for o in self.options]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"strategy {self.name!r}: options defined twice: {sorted(dup)}")

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

    def resolve(self, given: Mapping[str, Any], *, where: str | None = None, flags: bool = False) -> dict:
        """Every option of the schema, from ``given`` (raw values) or the default; raises OptionError.

        ``where`` says where the values came from (``recipe step 'teacher'``), for the message;
        ``flags=True`` names the options as command-line flags (``--label-budget``) in it.
        """
        place = where or f"strategy {self.name!r}"
        show = (lambda n: "--" + n.replace("_", "-")) if flags else repr
        hint = (lambda n: "--" + n.replace("_", "-")) if flags else str
        known = {o.name: o for o in self.options}
        errors = []
        for key in given:
            norm = key.replace("-", "_")
            if norm not in known:
                close = difflib.get_close_matches(norm, known, n=3)
                more = f"; did you mean {', '.join(map(hint, close))}?" if close else \
                    f"; known options: {', '.join(map(hint, known))}"
                errors.append(f"unknown option {show(norm) if flags else repr(key)}{more}")
        values = {k.replace("-", "_"): v for k, v in given.items()}
        out = {}
        for o in self.options:
            if o.name not in values:
                if o.required:
                    errors.append(f"option {show(o.name)} is required" + (f" ({o.help})" if o.help else ""))
                else:
                    out[o.name] = o.default
                continue
            try:
                v = o.convert(values[o.name])
                if o.choices and v not in o.choices:
                    raise ValueError(f"expected one of {', '.join(map(str, o.choices))}, got {v!r}")
                msg = o.check(v) if (o.check and v is not None) else None
                if msg:
                    raise ValueError(msg)
            except ValueError as e:
                errors.append(f"option {show(o.name)}: {e}")
                continue
            out[o.name] = v
        if errors:
            raise OptionError(f"{place}: " + "; ".join(errors))
        return out

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "options": [o.describe() for o in self.options]}


def positive(v) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def non_negative(v) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v}"


def fraction(v) -> str | None:
    return None if 0 <= v <= 1 else f"must be in [0, 1], got {v}"
