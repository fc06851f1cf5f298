"""The ``reuse run`` verb.

``reuse run STRATEGY --opt value ...`` builds its flags from the strategy's option schema (so
``reuse run STRATEGY --help`` lists them) and hands the raw strings to the same resolver as recipes
and Python, so a bad option gets the same message everywhere (exit status 2).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from reuse_core.cli.output import Parser, fail

RUN_EPILOG = """\
TARGET is a registered strategy (pretrain, finetune, distill, and those plugins add), a recipe
file (*.toml: named steps, later steps use earlier steps' models by name), or the name of a recipe
shipped with reuse-core (`reuse recipes` lists them; they run from any folder).
Options after the strategy come from its schema: `reuse run STRATEGY --help` lists them with their
type, default and help. Every run writes a run directory (default ./runs/<name>-<timestamp>, printed
at the end) and saves its models to the store (`reuse models list`).

examples:
  reuse run                                       list the strategies
  reuse run pretrain --help                       the options of pretrain
  reuse run pretrain --backbone small-cnn --classes 0-4 --epochs 5 --name digits-0-4
  reuse run finetune --model digits-0-4 --classes 5-9 --label-budget 10 --mode partial
  reuse run distill --teacher digits-0-4 --student-backbone mlp --student-backbone-config 'hidden=[64]'
  reuse run digits-transfer                       every step of a shipped recipe
  reuse run my-recipe.toml --set seed=3 --set epochs=2
  reuse run digits-transfer --resume              continue the newest unfinished run of that recipe

Ctrl-C stops a run and prints the command that continues it.
"""

COMMON_FLAGS = ("store", "run_dir", "device", "resume", "quiet")


def _add_common(p: argparse.ArgumentParser, *, defaults: argparse.Namespace | None = None) -> None:
    """The flags every run takes; ``defaults`` carries the values given before the strategy name."""
    d = defaults or argparse.Namespace(store=None, run_dir=None, device=None, resume=False, quiet=False)
    g = p.add_argument_group("run flags")
    g.add_argument("--store", default=d.store, metavar="DIR",
                   help="the model store (default: $REUSE_CORE_STORE or ~/.cache/reuse-core/store)")
    g.add_argument("--run-dir", default=d.run_dir, metavar="DIR",
                   help="where the run writes checkpoints and metrics (default: ./runs/<name>-<timestamp>)")
    g.add_argument("--device", default=d.device, metavar="DEV", help="cpu, cuda, cuda:1 ... (default: cuda when visible, else cpu)")
    g.add_argument("--resume", action="store_true", default=d.resume,
                   help="continue an interrupted run in --run-dir (default: the newest unfinished run of this "
                        "strategy or recipe); finished epochs and recipe steps are not run again")
    g.add_argument("--quiet", action="store_true", default=d.quiet, help="no progress bars or step logs; print the result only")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="STRATEGY|RECIPE.toml", help="a registered strategy or a recipe file")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                   help="the strategy's options (--opt value), or --set KEY=VALUE for a recipe")
    _add_common(p)


def _help_text(o) -> str:
    from reuse_core.strategy import REQUIRED

    bits = [o.type.__name__ + (" (one or more)" if o.type is list else "")]
    if o.default is REQUIRED:
        bits.append("required")
    elif o.default is not None:  # a None default is explained by the help text
        bits.append(f"default: {o.default}")
    if o.choices:
        bits.append("one of " + ", ".join(map(str, o.choices)))
    return f"{o.help} [{'; '.join(bits)}]".replace("%", "%%")


def strategy_parser(name: str, strategy, defaults: argparse.Namespace) -> argparse.ArgumentParser:
    """``reuse run NAME``'s parser: the common flags plus one flag per option of the schema. The
    flags keep the raw strings; the schema converts and checks them."""
    examples = strategy.examples or (" ".join([f"reuse run {name}", *(f"{o.flag} {o.name.upper()}" for o in
                                                                        strategy.options if o.required)]),)
    p = Parser(prog=f"reuse run {name}", description=strategy.description,
                                epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --epoch must be refused as in recipes, not read as --epochs
    _add_common(p, defaults=defaults)
    g = p.add_argument_group(f"{name} options")
    for o in strategy.options:
        if o.name in COMMON_FLAGS:
            raise SystemExit(f"reuse run: strategy {name!r} has an option {o.name!r} that clashes with --{o.name}")
        kw: dict = {"dest": "opt_" + o.name, "default": argparse.SUPPRESS, "help": _help_text(o)}
        if o.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = "{" + ",".join(map(str, o.choices)) + "}" if o.choices else (
                "ITEM" if o.type is list else o.type.__name__.upper())
            if o.type is list:
                kw["nargs"] = "+"
        g.add_argument(o.flag, **kw)
    return p


def _unknown_options(extra: list[str]) -> tuple[dict, list[str]]:
    """Flags the schema does not know, as raw options (so the resolver names them); stray words."""
    raw, stray, key = {}, [], None
    for tok in extra:
        if tok.startswith("--"):
            key, _, value = tok[2:].partition("=")
            raw[key] = value or None
        elif key is not None and raw[key] is None:
            raw[key] = tok
        else:
            stray.append(tok)
    return raw, stray


def _print_result(name: str, result, quiet: bool) -> None:
    """The scalar metrics (every metric is in the run directory's result.json), the saved models once
    each, and the run directory."""
    if not quiet:
        for k, v in result.metrics.items():
            if isinstance(v, (bool, int, float, str)) or v is None:
                print(f"  {k:<28} {v:.4g}" if isinstance(v, float) else f"  {k:<28} {v}")
    for m in result.models:
        print(f"{name}: model {m}")
    print(f"run directory: {result.run_dir} (every metric: result.json there)")


def _continue_command(target: str, run_dir, ns: argparse.Namespace, sets: list[str] = ()) -> str:
    parts = ["reuse", "run", target, "--resume", "--run-dir", str(run_dir)]
    parts += ["--store", ns.store] if ns.store else []
    parts += ["--device", ns.device] if ns.device else []
    for item in sets:
        parts += ["--set", item]
    return shlex.join(parts)


def _interrupted(command: str) -> int:
    print(f"reuse: interrupted; continue with: {command}", file=sys.stderr)
    return 130


def _run_recipe(path: str, rest: list[str], args: argparse.Namespace, target: str) -> int:
    from reuse_core import recipe
    from reuse_core.run import RunInterrupted

    p = Parser(prog=f"reuse run {target}", allow_abbrev=False)
    _add_common(p, defaults=args)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="give KEY=VALUE to every step whose strategy has the option KEY (repeatable)")
    ns = p.parse_args(rest)
    r = recipe.load(path)
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep:
            return fail(f"--set wants KEY=VALUE, got {item!r}")
        r = r.override(key, value)
    try:
        out = recipe.run(r, store=ns.store, run_dir=ns.run_dir, device=ns.device, resume=ns.resume, quiet=ns.quiet)
    except RunInterrupted as e:
        return _interrupted(_continue_command(target, e.run_dir, ns, ns.set))
    for step, res in out.steps.items():
        acc = res.metrics.get("test_accuracy")
        print(f"{step:<16} " + (f"test accuracy {acc:.4f}  " if isinstance(acc, float) else "") +
              (f"model {res.model}" if res.model else ""))
    print(f"run directory: {out.run_dir}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from reuse_core import plugins, recipe, run
    from reuse_core.engine.distributed import is_main_process

    registry = plugins.strategies()
    if args.target is None:
        print("strategies (reuse run STRATEGY --help for the options; `reuse recipes` lists the shipped recipes):")
        for e in registry.describe():
            print(f"  {e['name']:<20} {e['description']}  [{e['plugin']}]")
        return 2
    path = recipe.find(args.target, strategies=registry)
    if path is not None:
        return _run_recipe(str(path), args.rest, args, args.target)
    strategy = registry.get(args.target)
    ns, extra = strategy_parser(args.target, strategy, args).parse_known_args(args.rest)
    raw, stray = _unknown_options(extra)
    if stray:
        return fail(f"unexpected argument(s) {' '.join(stray)} (options are --name value)")
    raw.update({k[4:]: v for k, v in vars(ns).items() if k.startswith("opt_")})
    try:
        result = run.run(args.target, store=ns.store, run_dir=ns.run_dir, device=ns.device, resume=ns.resume,
                         quiet=ns.quiet, flags=True, **raw)
    except run.RunInterrupted as e:
        return _interrupted(_continue_command(args.target, e.run_dir, ns))
    if is_main_process():  # under torchrun, one report
        _print_result(args.target, result, ns.quiet)
    return 0


VERBS = [("run", "run a reuse strategy (pretrain, finetune, distill, ...) or a recipe of steps", RUN_EPILOG, _add_run,
          _run)]
