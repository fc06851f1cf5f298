"""The plugin manager: built-in plugins first, then third-party entry points, each one guarded.

A third-party plugin is any module named by an entry point in the group ``reuse_core``. One that
fails to import, breaks pluggy's validation, raises in a register hook or registers a name that is
taken is reported (:func:`plugin_infos`, ``reuse plugins``) and its failing part skipped; the rest
keeps working. ``REUSE_CORE_STRICT_PLUGINS=1`` turns each such report into a :class:`PluginError`
(for plugin authors' CI); ``REUSE_CORE_DISABLE_PLUGIN_AUTOLOAD=1`` loads the built-ins only.

A plugin that calls ``sys.exit()`` (or raises any other ``BaseException`` but ``KeyboardInterrupt``)
while it loads is reported the same way; what plugins print while they load goes to stderr, so it
cannot corrupt a command's output (``--json``); and each plugin's load time (import and register
hooks) is recorded (:attr:`PluginInfo.load_seconds`; over :data:`SLOW_LOAD_SECONDS` is slow).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pluggy

from reuse_core import __version__, hookspecs
from reuse_core.registry import NameTakenError, Registry, plural

ENTRY_POINT_GROUP = "reuse_core"
STRICT_ENV = "REUSE_CORE_STRICT_PLUGINS"
DISABLE_AUTOLOAD_ENV = "REUSE_CORE_DISABLE_PLUGIN_AUTOLOAD"

# Registered first, in this order, exactly as a third-party plugin would be.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "reuse_core.builtin.backbones",
    "reuse_core.builtin.datasets",
    "reuse_core.builtin.strategies",
)

# torch is imported before the clock starts: every plugin needs it, and it is no plugin's own cost.
SHARED_IMPORTS: tuple[str, ...] = ("torch",)

# A plugin taking longer than this (import and register hooks) is marked slow in `reuse plugins`.
SLOW_LOAD_SECONDS = 1.0

REGISTER_HOOKS = {
    "reuse_register_backbones": "backbone",
    "reuse_register_strategies": "strategy",
    "reuse_register_datasets": "dataset",
}


class PluginError(RuntimeError):
    """A plugin failed to load or register while ``REUSE_CORE_STRICT_PLUGINS=1``."""


class PluginHookError(RuntimeError):
    """A lifecycle hook raised during a run; names the plugin and the hook. The original
    exception is the ``__cause__``."""

    def __init__(self, plugin: str, distribution: str, hook: str, error: BaseException):
        self.plugin, self.distribution, self.hook = plugin, distribution, hook
        super().__init__(f"plugin {plugin!r} ({distribution}) failed in {hook}: {type(error).__name__}: {error}")


@dataclass
class PluginInfo:
    """One plugin as ``reuse plugins`` lists it. ``error`` is None when everything loaded;
    ``load_seconds`` is the time its import and its register hooks took."""

    name: str
    distribution: str
    version: str
    description: str = ""
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    load_seconds: float = 0.0

    @property
    def slow(self) -> bool:
        return self.load_seconds > SLOW_LOAD_SECONDS

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "load_seconds": round(self.load_seconds, 4), "slow": self.slow}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


class ReusePluginManager(pluggy.PluginManager):
    """A pluggy manager for project ``reuse_core`` with the three registries and a report per
    plugin. Use :func:`get_plugin_manager`; build one directly only to load with other settings."""

    def __init__(self, *, strict: bool | None = None, autoload: bool | None = None):
        super().__init__("reuse_core")
        self.add_hookspecs(hookspecs)
        self.strict = _env_flag(STRICT_ENV) if strict is None else strict
        self.autoload = not _env_flag(DISABLE_AUTOLOAD_ENV) if autoload is None else autoload
        self.backbones: Registry[Any] = Registry("backbone")
        self.strategies: Registry[Any] = Registry("strategy")
        self.datasets: Registry[Any] = Registry("dataset")
        self._infos: dict[str, PluginInfo] = {}

    # ---- loading --------------------------------------------------------------------------

    def load(self, builtins: tuple[str, ...] = BUILTIN_PLUGINS) -> ReusePluginManager:
        """Import and register the built-ins, then (unless autoload is off) the entry points,
        then run the register hooks. Returns self. What the plugins print meanwhile goes to stderr."""
        for module in SHARED_IMPORTS if builtins else ():
            with contextlib.suppress(ImportError):  # then the built-ins report it
                importlib.import_module(module)
        with contextlib.redirect_stdout(sys.stderr):
            dist_version = _distribution_version("reuse-core")
            for module in builtins:
                self._add_plugin(module, "reuse-core", dist_version, functools.partial(importlib.import_module, module))
            if self.autoload:
                for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                    dist = ep.dist
                    self._add_plugin(ep.name, dist.name if dist else "?", dist.version if dist else "?", ep.load)
            for hook_name, kind in REGISTER_HOOKS.items():
                self._run_register_hook(hook_name, getattr(self, _REGISTRY_ATTR[kind]))
        return self

    def _report(self, info: PluginInfo, message: str) -> None:
        info.error = message if info.error is None else f"{info.error}; {message}"
        text = f"reuse-core plugin {info.name!r} ({info.distribution} {info.version}): {message}"
        if self.strict:
            raise PluginError(f"{text} (fatal because {STRICT_ENV}=1)")  # one line, as `reuse` prints it
        warnings.warn(text, RuntimeWarning, stacklevel=2)

    def _add_plugin(self, name: str, distribution: str, version: str, load: Callable[[], object]) -> None:
        info = PluginInfo(name, distribution, version)
        if name in self._infos:
            self._report(info, f"another plugin is already called {name!r} (from {self._infos[name].distribution}); skipped")
            return
        self._infos[name] = info
        start = time.perf_counter()
        try:
            plugin = load()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SystemExit too: a plugin must not end the process
            self._report(info, f"failed to import: {_error_text(e)}")
            return
        finally:
            info.load_seconds += time.perf_counter() - start
        info.description = _first_line(plugin)
        if self.is_registered(plugin):
            self._report(info, f"is the same object as plugin {self.get_name(plugin)!r}; skipped")
            return
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as e:
            self.unregister(name=name)
            detail = " ".join(str(e).split())
            self._report(info, f"is invalid and was skipped: {detail}")
            return
        info.hooks = sorted(c.name for c in self.get_hookcallers(plugin) or ())
        for caller in self.get_hookcallers(plugin) or ():
            if caller.spec is None:
                self._report(info, _unknown_hook_message(caller.name))
        wrappers = [i.specname or i.function.__name__ for c in self.get_hookcallers(plugin) or ()
                    for i in c.get_hookimpls() if i.plugin is plugin and (i.wrapper or i.hookwrapper)]
        if wrappers:
            self.unregister(plugin)
            info.hooks = []
            self._report(info, f"wrapper implementations are not supported for reuse-core hooks ({', '.join(wrappers)}); skipped")

    def _run_register_hook(self, hook_name: str, registry: Registry[Any]) -> None:
        # Each plugin's implementation runs on its own, so one failure skips only that plugin's part.
        for impl in getattr(self.hook, hook_name).get_hookimpls():
            info = self._infos[impl.plugin_name]

            def on_taken(err: NameTakenError, info: PluginInfo = info) -> None:
                self._report(info, str(err))

            start = time.perf_counter()
            try:
                with registry.adding_as(impl.plugin_name, on_taken):
                    _call_impl(impl, {"registry": registry})
            except (PluginError, KeyboardInterrupt):
                raise
            except BaseException as e:  # SystemExit too
                self._report(info, f"{hook_name} raised {_error_text(e)} (its {plural(registry.kind)} were not registered)")
            finally:
                info.load_seconds += time.perf_counter() - start

    # ---- reports --------------------------------------------------------------------------

    def plugin_infos(self) -> list[PluginInfo]:
        """Every plugin the manager tried to load, in load order, failed ones included."""
        return list(self._infos.values())

    def distribution_of(self, plugin_name: str) -> str:
        info = self._infos.get(plugin_name)
        return f"{info.distribution} {info.version}" if info else "?"


def _error_text(e: BaseException) -> str:
    """``Type: message`` for an exception; ``SystemExit(7)`` for the others (an exit, a generator
    closing), whose message alone would say nothing."""
    return f"{type(e).__name__}: {e}" if isinstance(e, Exception) else repr(e)


def _call_impl(impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> Any:
    # pluggy has validated at registration that an impl asks only for arguments the spec has.
    return impl.function(*[kwargs[a] for a in impl.argnames])


_REGISTRY_ATTR = {"backbone": "backbones", "strategy": "strategies", "dataset": "datasets"}


def _distribution_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return __version__


def _unknown_hook_message(name: str) -> str:
    import difflib

    known = [n for n in dir(hookspecs) if n.startswith("reuse_")]
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; the hooks are: {', '.join(known)}"
    return f"implements {name!r}, which is not a reuse-core hook (it is never called){hint}"


@functools.cache
def get_plugin_manager() -> ReusePluginManager:
    """The process's plugin manager, loaded once (built-ins, then entry points).

    Raises :class:`PluginError` under ``REUSE_CORE_STRICT_PLUGINS=1`` if any plugin fails.
    """
    return ReusePluginManager().load()


def backbones() -> Registry[Any]:
    return get_plugin_manager().backbones


def strategies() -> Registry[Any]:
    return get_plugin_manager().strategies


def datasets() -> Registry[Any]:
    return get_plugin_manager().datasets


def plugin_infos() -> list[PluginInfo]:
    return get_plugin_manager().plugin_infos()


class LifecycleRelay:
    """Calls every implementation of the lifecycle hooks (keyword arguments only). If one raises,
    the call raises :class:`PluginHookError` naming the plugin; the remaining implementations of
    that call are not run, so the run stops instead of going on half-applied."""

    def __init__(self, pm: ReusePluginManager):
        self._pm = pm

    def _call(self, hook_name: str, kwargs: dict[str, Any]) -> list[Any]:
        results = []
        # get_hookimpls() lists in reverse call order: call as pluggy would.
        for impl in reversed(getattr(self._pm.hook, hook_name).get_hookimpls()):
            try:
                res = _call_impl(impl, kwargs)
            except Exception as e:
                raise PluginHookError(impl.plugin_name, self._pm.distribution_of(impl.plugin_name), hook_name, e) from e
            if res is not None:
                results.append(res)
        return results

    def reuse_run_start(self, *, strategy: str, options: dict, run_dir: str) -> None:
        self._call("reuse_run_start", {"strategy": strategy, "options": options, "run_dir": run_dir})

    def reuse_epoch_end(self, *, strategy: str, epoch: int, metrics: dict) -> None:
        self._call("reuse_epoch_end", {"strategy": strategy, "epoch": epoch, "metrics": metrics})

    def reuse_run_end(self, *, strategy: str, result: dict) -> None:
        self._call("reuse_run_end", {"strategy": strategy, "result": result})

    def reuse_adjust_loss(self, *, strategy: str, loss, model, inputs, targets, outputs) -> list:
        """The list of the non-None terms the plugins return; the caller adds them to the loss."""
        return self._call("reuse_adjust_loss", {
            "strategy": strategy, "loss": loss, "model": model, "inputs": inputs, "targets": targets, "outputs": outputs,
        })


def lifecycle_relay(pm: ReusePluginManager | None = None) -> LifecycleRelay:
    """The relay a strategy hands the engine (``fit(..., hooks=lifecycle_relay())``)."""
    return LifecycleRelay(pm or get_plugin_manager())
