"""`reuse plugins`, `reuse backbones`, `reuse strategies`, `reuse datasets`: what the plugins provide."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable

from reuse_core.cli.output import fail, table

PLUGINS_EPILOG = """\
Lists every plugin: the built-in ones (reuse-core) first, then those found through the entry-point
group "reuse_core", with the hooks each implements and how long it took to load. A plugin that
failed to import (or called sys.exit), broke a hook's contract or took a name already registered
shows its error; the rest still load. Set REUSE_CORE_STRICT_PLUGINS=1 to make such failures fatal
(exit status 1), or REUSE_CORE_DISABLE_PLUGIN_AUTOLOAD=1 to load the built-ins only.

LOAD is the time a plugin's import and register hooks took (load_seconds in --json), which every
reuse command waits for; "(slow)" marks a plugin over 1 s (slow in --json). What plugins print
while they load goes to stderr.

examples:
  reuse plugins
  reuse plugins --json | python -m json.tool
  REUSE_CORE_STRICT_PLUGINS=1 reuse plugins     in a plugin's CI: fail on any plugin error
"""

BACKBONES_EPILOG = """\
Lists every registered backbone: the small built-in models, every torchvision classification model
(untrained, built for any number of classes and input channels) and those plugins add. MIN INPUT is
the smallest image side the model accepts ("=224": exactly that size, set by the config
image_size); "-" means any size.

examples:
  reuse backbones
  reuse backbones --json | python -c "import json,sys; print([b['name'] for b in json.load(sys.stdin)])"
"""

STRATEGIES_EPILOG = """\
Lists every registered reuse strategy (fine-tuning, distillation, ensembles, ...), built-in or
added by a plugin; run one with `reuse run <strategy>`.

examples:
  reuse strategies
  reuse strategies --json
"""

DATASETS_EPILOG = """\
Lists every registered dataset: digits is embedded (no download); CIFAR-10/100 and image folders
read a local folder (each entry says where).

examples:
  reuse datasets
  reuse datasets --json
"""


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON array of objects (at least name and description)")


def _load_manager():
    """The plugin manager, with its load reports printed as one clean line each; None (after
    printing why) when strict mode made a failure fatal."""
    from reuse_core import plugins

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            pm = plugins.get_plugin_manager()
        except plugins.PluginError as e:
            fail(str(e), 1)
            return None
    for w in caught:
        print(f"reuse: warning: {w.message}", file=sys.stderr)
    return pm


def _lister(attr: str, columns: list[tuple[str, Callable[[dict], str]]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        pm = _load_manager()
        if pm is None:
            return 1
        if attr == "plugins":
            rows = [i.as_dict() for i in pm.plugin_infos()]
        else:
            rows = getattr(pm, attr).describe()
        if args.json:
            print(json.dumps(rows, indent=2))
        elif rows:
            print(table([[h for h, _ in columns], *([f(r) for _, f in columns] for r in rows)]))
        else:
            print(f"no {attr} registered")
        return 0

    return run


def _min_input(row: dict) -> str:
    size = row.get("min_input_size")
    return "-" if not size else (f"={size}" if row.get("fixed_input_size") else str(size))


def _load_time(row: dict) -> str:
    return f"{row['load_seconds']:.2f}s" + (" (slow)" if row["slow"] else "")


def _or_dash(key: str) -> Callable[[dict], str]:
    return lambda r: "-" if r.get(key) is None else str(r[key])


VERBS = [
    (
        "plugins", "list the installed plugins, their hooks and any load errors", PLUGINS_EPILOG, _add_json,
        _lister("plugins", [
            ("NAME", lambda r: r["name"]), ("DISTRIBUTION", lambda r: f"{r['distribution']} {r['version']}"),
            ("HOOKS", lambda r: ", ".join(h.removeprefix("reuse_") for h in r["hooks"]) or "-"),
            ("LOAD", _load_time),
            ("STATUS", lambda r: f"ERROR: {r['error']}" if r["error"] else "ok"),
        ]),
    ),
    (
        "backbones", "list the backbones models can be built from", BACKBONES_EPILOG, _add_json,
        _lister("backbones", [
            ("NAME", lambda r: r["name"]), ("FAMILY", _or_dash("family")), ("MIN INPUT", _min_input),
            ("PLUGIN", lambda r: r["plugin"]), ("DESCRIPTION", lambda r: r["description"]),
        ]),
    ),
    (
        "strategies", "list the reuse strategies `reuse run` can run", STRATEGIES_EPILOG, _add_json,
        _lister("strategies", [
            ("NAME", lambda r: r["name"]), ("PLUGIN", lambda r: r["plugin"]), ("DESCRIPTION", lambda r: r["description"]),
        ]),
    ),
    (
        "datasets", "list the datasets and where each reads its data", DATASETS_EPILOG, _add_json,
        _lister("datasets", [
            ("NAME", lambda r: r["name"]), ("SOURCE", _or_dash("source")), ("CLASSES", _or_dash("num_classes")),
            ("PLUGIN", lambda r: r["plugin"]), ("DESCRIPTION", lambda r: r["description"]),
        ]),
    ),
]
