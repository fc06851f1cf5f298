"""Running a strategy from Python: ``reuse_core.run("finetune", model="teacher", classes=[5, 6])``.

:func:`run` looks the strategy up in the registry, resolves its options through the schema (the
same :class:`~reuse_core.strategy.OptionError` as the command line and recipes), prepares a run
directory and a :class:`RunContext`, and calls the strategy. A run directory holds ``run.json``
(strategy and resolved options), the engine's checkpoints and metrics, and ``result.json`` once the
run has finished; ``resume=True`` continues from there.
"""
from __future__ import annotations

import datetime
import os
import secrets
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from reuse_core.engine.distributed import is_main_process
from reuse_core.files import read_json, write_json
from reuse_core.strategy import OptionError, StrategyResult
from reuse_core.strategy.context import RunContext

__all__ = ["RunContext", "RunError", "RunInterrupted", "run"]

RUNS_DIR = Path("runs")
RUN_FILE = "run.json"
RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"  # a run that raised: --resume without --run-dir passes it over


class RunError(RuntimeError):
    """A run cannot start or continue: no run to resume, options changed since, an unknown model."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM turned into it) stopped a run; ``run_dir`` is where ``resume=True`` continues it."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = Path(run_dir)


def default_store(store=None):
    """``store`` as a ModelStore: an existing one, a path, or None for the default location."""
    from reuse_core.store import ModelStore

    return store if isinstance(store, ModelStore) else ModelStore(store)


def new_run_dir(prefix: str, parent: str | os.PathLike = RUNS_DIR) -> Path:
    """A fresh ``<parent>/<prefix>-<timestamp>`` (a suffix keeps two runs in one second apart)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = Path(parent)
    path, n = parent / f"{prefix}-{stamp}", 1
    while path.exists():
        n += 1
        path = parent / f"{prefix}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def latest_unfinished(prefix: str, kind_file: str = RUN_FILE, parent: str | os.PathLike = RUNS_DIR, *,
                      matches: Callable[[dict], bool] = lambda recorded: True, what: str = "") -> Path:
    """The newest ``<parent>/<prefix>-*`` run directory of this kind (it holds ``kind_file``) that was
    interrupted (neither finished nor failed) and whose recorded ``kind_file`` ``matches``; ``what``
    describes that condition in the error when there is none."""
    parent = Path(parent)
    runs = sorted((p for p in parent.glob(f"{prefix}-*") if (p / kind_file).exists()
                   and not (p / RESULT_FILE).exists() and not (p / FAILED_FILE).exists()),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in runs:
        try:
            recorded = read_json(candidate / kind_file)
        except ValueError:  # a damaged record is no run to continue
            continue
        if isinstance(recorded, dict) and matches(recorded):
            return candidate
    raise RunError(f"nothing to resume: no unfinished {prefix!r} run{what} under {parent}/ (give --run-dir, or "
                   "start a new run without --resume)")


def run(strategy: str, *, store=None, run_dir: str | os.PathLike | None = None, device=None,
        resume: bool = False, quiet: bool = False, refs: Mapping[str, str] | None = None,
        where: str | None = None, flags: bool = False, **options: Any) -> StrategyResult:
    """Run a registered strategy with ``options`` (raw values: strings are converted as on the command
    line) and return its :class:`~reuse_core.strategy.StrategyResult`.

    ``store``: a ModelStore or its folder (default: ``$REUSE_CORE_STORE`` or the user cache).
    ``run_dir``: default ``./runs/<strategy>-<timestamp>``. ``resume=True`` continues the run in
    ``run_dir`` (default: the newest unfinished run of this strategy): its recorded options are
    used, finished epochs are not trained again, and a finished run returns its recorded result.
    ``refs``: recipe step name -> store ID. ``where`` names the caller in option errors, and
    ``flags=True`` names the options as command-line flags there (``reuse run`` does).
    """
    from reuse_core import plugins
    from reuse_core.engine.distributed import default_device

    strat = plugins.strategies().get(strategy)
    if run_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RunError("under torchrun every process must use the same run directory: give run_dir (--run-dir)")
    if resume:
        if run_dir is None:
            run_dir = latest_unfinished(strategy, matches=lambda rec: _same_run(strat, rec, options),
                                        what=" of this strategy with these options")
        run_dir = Path(run_dir)
        recorded = read_json(run_dir / RUN_FILE)
        if recorded is None:
            raise RunError(f"nothing to resume in {run_dir}: it has no {RUN_FILE}")
        if recorded["strategy"] != strategy:
            raise RunError(f"{run_dir} is a {recorded['strategy']!r} run, not {strategy!r}")
        resolved = strat.resolve({**recorded["options"], **options}, where=where, flags=flags)
        changed = sorted(k for k in resolved if resolved[k] != recorded["options"].get(k))
        if changed:
            raise OptionError(f"{where or f'strategy {strategy!r}'}: cannot resume {run_dir} with other values of "
                              f"{', '.join(changed)} than it started with")
        done = read_json(run_dir / RESULT_FILE)
        if done is not None:
            return StrategyResult(metrics=done["metrics"], models=done["models"], run_dir=str(run_dir))
        run_id = recorded.get("id") or str(run_dir.resolve())  # runs from before run ids named by their folder
    else:
        resolved = strat.resolve(options, where=where, flags=flags)
        run_dir = new_run_dir(strategy) if run_dir is None else Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_main_process() and (run_dir / RUN_FILE).exists():
            raise RunError(f"{run_dir} already holds a run: pass resume=True (--resume) or another run directory")
        run_id = secrets.token_hex(8)
    ctx = RunContext(strategy=strategy, store=default_store(store), hooks=plugins.lifecycle_relay(),
                     run_dir=run_dir, device=default_device(device), resume=resume, quiet=quiet,
                     refs=dict(refs or {}), run_id=run_id)
    if is_main_process():
        write_json(run_dir / RUN_FILE, {"id": run_id, "strategy": strategy, "options": resolved,
                                        "started": datetime.datetime.now().isoformat(timespec="seconds")})
    try:
        result = strat.run(ctx, resolved)
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir) from None
    except Exception as e:
        if is_main_process():
            write_json(run_dir / FAILED_FILE, {"error": f"{type(e).__name__}: {e}",
                                               "failed": datetime.datetime.now().isoformat(timespec="seconds")})
        if isinstance(e, OptionError):  # found while running (a setting the dataset or backbone lacks): say where
            raise OptionError(_placed(str(e), where or f"strategy {strategy!r}", strat, flags)) from None
        raise
    result.run_dir = str(run_dir)
    if is_main_process():
        write_json(run_dir / RESULT_FILE, {"metrics": result.metrics, "models": result.models,
                                           "finished": datetime.datetime.now().isoformat(timespec="seconds")})
    return result


def _same_run(strategy, recorded: dict, options: Mapping[str, Any]) -> bool:
    """Whether a recorded run is of ``strategy`` with the values ``options`` gives (the others as recorded)."""
    if recorded.get("strategy") != strategy.name or not isinstance(recorded.get("options"), dict):
        return False
    try:
        resolved = strategy.resolve({**recorded["options"], **options})
    except OptionError:
        return False
    return all(resolved[k] == recorded["options"].get(k) for k in resolved)


def _placed(message: str, place: str, strategy, flags: bool) -> str:
    if flags:
        for o in strategy.options:
            message = message.replace(f"option {o.name!r}", f"option {o.flag}")
    return message if message.startswith(place) else f"{place}: {message}"


class _CallableModule(types.ModuleType):
    """``reuse_core.run`` is both this module and the function: importing a submodule makes it an
    attribute of the package, which would otherwise hide the function ``reuse_core.run(...)``."""

    def __call__(self, strategy: str, **kwargs: Any) -> StrategyResult:
        return run(strategy, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
