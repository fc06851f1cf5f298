"""Recipes: named strategy steps in a TOML file, run in order (``reuse run RECIPE.toml``).

.. code-block:: toml

    description = "pretrain on 0-4, fine-tune to 5-9"

    [defaults]            # given to every step whose strategy has the option (a step's own value wins)
    seed = 0

    [[step]]
    name = "teacher"
    strategy = "pretrain"
    backbone = "small-cnn"
    classes = ["0-4"]

    [[step]]
    name = "transfer"
    strategy = "finetune"
    model = "teacher"     # an earlier step's model, by the step's name
    classes = ["5-9"]

Every step is checked before the first one runs: strategy, option names, types and values (the
same :class:`~reuse_core.strategy.OptionError` text as the command line and Python), and model
references (an earlier step, or a model in the store). A run directory holds ``recipe.json`` (the
steps as run), one run directory per step under ``steps/``, and ``result.json`` at the end;
``resume=True`` skips the finished steps and continues the interrupted one. A step's model is named
``<recipe>.<step>`` in the store unless the step gives a ``name``.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reuse_core.files import read_json, write_json
from reuse_core.strategy import OptionError, StrategyResult

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

TOP_LEVEL = ("description", "defaults", "step")
SHIPPED_DIR = Path(__file__).with_name("recipes")  # package data: found from any folder
RECIPE_FILE = "recipe.json"


class RecipeError(ValueError):
    """A recipe that cannot run: bad TOML, a malformed or unknown step, bad options, a bad reference.
    Each line names the recipe, the step and the key."""


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    strategy: str
    options: dict  # raw values, as written in the step


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...]
    description: str = ""
    defaults: dict = dataclasses.field(default_factory=dict)
    source: str = "<recipe>"
    problems: tuple[str, ...] = ()  # structural errors parse found; check() reports them with the rest

    @property
    def stem(self) -> str:
        return Path(self.source).stem if self.source != "<recipe>" else "recipe"

    def step_options(self, step: Step, strategy) -> dict:
        """The step's raw options: the defaults its strategy has, then the step's own values."""
        names = {o.name for o in strategy.options}
        return {**{k: v for k, v in self.defaults.items() if k.replace("-", "_") in names}, **step.options}

    def override(self, key: str, value: Any, *, strategies=None) -> Recipe:
        """The recipe with ``key = value`` in every step whose strategy has that option."""
        strategies = strategies or _registry()
        key = key.replace("-", "_")
        steps, hit = [], False
        for s in self.steps:
            if s.strategy in strategies and any(o.name == key for o in strategies.get(s.strategy).options):
                s, hit = dataclasses.replace(s, options={**s.options, key: value}), True
            steps.append(s)
        if not hit:
            raise RecipeError(f"{self.source}: no step has an option {key!r} to set")
        return dataclasses.replace(self, steps=tuple(steps))

    def as_dict(self) -> dict:
        return {"source": self.source, "description": self.description, "defaults": self.defaults,
                "steps": [dataclasses.asdict(s) for s in self.steps]}


def _registry():
    from reuse_core import plugins

    return plugins.strategies()


def parse(text: str, source: str = "<recipe>") -> Recipe:
    """The recipe's structure. Bad TOML is a :class:`RecipeError` at once; other structural problems
    (tables, step names and strategies) are kept in ``problems``, and :func:`check` reports them
    together with the steps' options."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from None
    errors = [f"{source}: unknown top-level key {k!r} (a recipe has: description, [defaults], [[step]] tables)"
              for k in doc if k not in TOP_LEVEL]
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        errors.append(f"{source}: defaults must be a table ([defaults])")
        defaults = {}
    raw_steps = doc.get("step", [])
    if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
        errors.append(f"{source}: step must be an array of tables ([[step]])")
        raw_steps = []
    elif not raw_steps:
        errors.append(f"{source}: no steps (add [[step]] tables with a name and a strategy)")
    steps, seen = [], {}
    for i, raw in enumerate(raw_steps, 1):
        name, strategy = raw.get("name"), raw.get("strategy")
        label = f"{source}, step {name!r}" if isinstance(name, str) and name else f"{source}, step {i}"
        if not isinstance(name, str) or not name:
            errors.append(f"{label}: needs a name (name = \"...\"), got {name!r}")
            name = f"#{i}"  # its options are still checked
        elif name in seen:
            errors.append(f"{label}: the name is taken by step {seen[name]} (step names must be unique)")
            continue
        seen[name] = i
        if not isinstance(strategy, str) or not strategy:
            errors.append(f"{label}: needs a strategy (strategy = \"...\"), got {strategy!r}")
            strategy = ""  # check() then cannot tell which options it takes
        steps.append(Step(name, strategy, {k: v for k, v in raw.items() if k not in ("name", "strategy")}))
    return Recipe(tuple(steps), str(doc.get("description", "")), dict(defaults), source, tuple(errors))


def shipped() -> dict[str, Path]:
    """The recipes shipped with reuse-core, by name (the file's stem)."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.toml"))}


def find(target: str, *, strategies=None) -> Path | None:
    """The recipe file ``target`` names, or None when it names a strategy: an existing file, a
    ``*.toml`` path, or the name of a shipped recipe (with or without ``.toml``) that no strategy has."""
    path = Path(target)
    if path.is_file():
        return path
    name = target.removesuffix(".toml")
    if target.endswith(".toml") and (path.parent != Path(".") or name not in shipped()):
        return path  # a path that is not there: load() says so
    if target in (strategies if strategies is not None else _registry()):
        return None
    return shipped().get(name)


def load(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
    return parse(text, str(path))


def _ref_problem(ref: str, index: int, order: dict[str, int], store) -> str | None:
    if ref in order:
        if order[ref] >= index:
            return f"refers to step {ref!r}, which does not come before it (steps run in order)"
        return None
    if store is None:
        return None
    from reuse_core.store import StoreError

    try:
        store.resolve(ref)
    except StoreError as e:
        return f"{ref!r} is no earlier step ({', '.join(list(order)[:index]) or 'none'}) and no stored model: {e}"
    return None


def check(recipe: Recipe, *, store=None, strategies=None) -> dict[str, dict]:
    """Every step's resolved options, or a :class:`RecipeError` listing every problem at once: the
    structural ones parse found, unknown strategies, bad options, model references to a later or
    unknown step (with ``store``, a reference that is no step must name a model in it), and defaults
    no step takes."""
    from reuse_core.registry import UnknownNameError

    strategies = strategies or _registry()
    order = {s.name: i for i, s in enumerate(recipe.steps)}
    errors, resolved, used, partial = list(recipe.problems), {}, set(), False
    for i, step in enumerate(recipe.steps):
        where = f"{recipe.source}, step " + (step.name[1:] if step.name.startswith("#") else repr(step.name))
        if not step.strategy:
            partial = True
            continue
        try:
            strat = strategies.get(step.strategy)
        except UnknownNameError as e:
            errors.append(f"{where}: {e}")
            partial = True  # which options that step takes is unknown
            continue
        raw = recipe.step_options(step, strat)
        used.update(k for k in raw if k in recipe.defaults)
        try:
            opts = strat.resolve(raw, where=where)
            resolved[step.name] = opts
        except OptionError as e:
            errors.append(str(e))
            opts = {k.replace("-", "_"): v for k, v in raw.items()}  # the references are still checked
        for o in strat.options:
            try:
                refs = o.convert(opts[o.name]) if o.ref and opts.get(o.name) is not None else None
            except ValueError:
                continue  # reported by resolve
            for ref in (refs if o.type is list else [refs]) if refs is not None else []:
                problem = _ref_problem(ref, i, order, store)
                if problem:
                    errors.append(f"{where}: option {o.name!r}: {problem}")
    if not partial:  # every step's strategy known: a default none takes is a typo
        errors += [f"{recipe.source}, [defaults]: {k!r} is an option of no step" for k in recipe.defaults if k not in used]
    if errors:
        raise RecipeError("\n".join(errors))
    return resolved


def _same_recipe(recipe: Recipe, recorded: dict) -> bool:
    return recorded.get("steps") == recipe.as_dict()["steps"] and recorded.get("defaults", {}) == recipe.defaults


@dataclasses.dataclass
class RecipeResult:
    run_dir: Path
    steps: dict[str, StrategyResult]


def run(recipe: Recipe, *, store=None, run_dir: str | os.PathLike | None = None, device=None,
        resume: bool = False, quiet: bool = False, models: Mapping[str, str] | None = None) -> RecipeResult:
    """Check every step, then run them in order, each in ``<run_dir>/steps/<name>``; later steps
    find earlier steps' models by name. ``run_dir`` defaults to ``./runs/<recipe>-<timestamp>``;
    ``resume=True`` continues the run there (default: the newest unfinished run of this recipe):
    finished steps are not run again, the interrupted one continues from its checkpoint.
    ``models``: step name -> store ID of a model that already exists; those steps are not run and
    stand for that model (``reuse demo`` reuses one recipe's models in the next)."""
    from reuse_core import run as run_mod

    store = run_mod.default_store(store)
    check(recipe, store=store)
    if resume:
        if run_dir is None:
            run_dir = run_mod.latest_unfinished(recipe.stem, RECIPE_FILE, matches=lambda rec: _same_recipe(recipe, rec),
                                                what=" of this recipe with these values")
        run_dir = Path(run_dir)
        recorded = read_json(run_dir / RECIPE_FILE)
        if recorded is None:
            raise run_mod.RunError(f"nothing to resume in {run_dir}: it has no {RECIPE_FILE}")
        if not _same_recipe(recipe, recorded):
            raise RecipeError(f"{recipe.source}: the recipe differs from the one {run_dir} started with; "
                              "resume with the same recipe (and --set values) or start a new run")
    else:
        run_dir = run_mod.new_run_dir(recipe.stem) if run_dir is None else Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / RECIPE_FILE).exists():
            raise run_mod.RunError(f"{run_dir} already holds a recipe run: pass resume=True (--resume) or another run directory")
        write_json(run_dir / RECIPE_FILE, recipe.as_dict())
    strategies = _registry()
    refs: dict[str, str] = {}
    results: dict[str, StrategyResult] = {}
    models = dict(models or {})
    unknown = sorted(set(models) - {s.name for s in recipe.steps})
    if unknown:
        raise RecipeError(f"{recipe.source}: models given for steps it does not have: {', '.join(unknown)}")
    for i, step in enumerate(recipe.steps, 1):
        step_dir = run_dir / "steps" / step.name
        if step.name in models:
            mid = store.resolve(models[step.name])
            results[step.name] = StrategyResult(metrics=store.manifest(mid)["metrics"], models=[mid])
            refs[step.name] = mid
            continue
        if not quiet:
            print(f"[{i}/{len(recipe.steps)}] step {step.name!r} ({step.strategy})", flush=True)
        strat = strategies.get(step.strategy)
        options = recipe.step_options(step, strat)
        if any(o.name == "name" for o in strat.options):  # `reuse models list` then says where a model came from
            options.setdefault("name", f"{recipe.stem}.{step.name}")
        try:
            result = run_mod.run(
                step.strategy, store=store, run_dir=step_dir, device=device,
                resume=resume and (step_dir / run_mod.RUN_FILE).exists(), quiet=quiet, refs=refs,
                where=f"{recipe.source}, step {step.name!r}", **options,
            )
        except KeyboardInterrupt:
            raise run_mod.RunInterrupted(run_dir) from None
        except Exception as e:
            write_json(run_dir / run_mod.FAILED_FILE, {"step": step.name, "error": f"{type(e).__name__}: {e}"})
            raise
        results[step.name] = result
        if result.model is not None:
            refs[step.name] = result.model
    write_json(run_dir / run_mod.RESULT_FILE, {
        "steps": {n: {"strategy": s.strategy, "metrics": results[n].metrics, "models": results[n].models}
                  for n, s in ((s.name, s) for s in recipe.steps)},
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    return RecipeResult(run_dir, results)
