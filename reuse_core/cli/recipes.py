"""``reuse recipes``: the recipes shipped with reuse-core, which ``reuse run NAME`` runs from any folder."""
from __future__ import annotations

import argparse
import json

from reuse_core.cli.output import table

RECIPES_EPILOG = """\
A recipe is a TOML file of named steps, each a strategy with its options; later steps use earlier
steps' models by name. `reuse run NAME` runs a shipped one from any folder (`--set KEY=VALUE`
changes an option in every step that has it); copy its file (PATH) to start your own.

examples:
  reuse recipes
  reuse run digits-transfer --set epochs=2
  reuse recipes --json
"""


def _add_recipes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON array (name, description, steps, path)")


def _run_recipes(args: argparse.Namespace) -> int:
    from reuse_core import recipe

    rows = []
    for name, path in recipe.shipped().items():
        r = recipe.load(path)
        rows.append({"name": name, "description": r.description,
                     "steps": [f"{s.name} ({s.strategy})" for s in r.steps], "path": str(path)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table([["NAME", "STEPS", "DESCRIPTION"],
                     *([r["name"], str(len(r["steps"])), " ".join(r["description"].split())] for r in rows)]))
    return 0


VERBS = [("recipes", "list the recipes shipped with reuse-core (reuse run NAME runs one)", RECIPES_EPILOG,
          _add_recipes, _run_recipes)]
