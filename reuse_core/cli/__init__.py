"""The ``reuse`` command: one module per verb (or, for the plugin listings, one kind of verb),
each with a ``VERBS`` list of (name, help, epilog, add_arguments, run) tuples, in the order
``reuse --help`` lists them. Shared output (tables, errors) is in :mod:`reuse_core.cli.output`.

Heavy imports (torch, the kernels, the plugins) happen inside the verbs, so ``reuse --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from reuse_core import __version__
from reuse_core.cli import bench, demo, doctor, listing, models, output, recipes, run

Verb = tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

VERB_MODULES = (bench, doctor, models, listing, recipes, run, demo)


def all_verbs() -> list[Verb]:
    return [verb for module in VERB_MODULES for verb in module.VERBS]


def build_parser() -> argparse.ArgumentParser:
    parser = output.Parser(
        prog="reuse",
        description="reuse-core: reuse trained models and move knowledge between them "
        "(fused distillation, ensemble-averaging and attention kernels for PyTorch).",
        epilog="Run `reuse <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"reuse-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, help_, epilog, add, run_verb in all_verbs():
        p = sub.add_parser(
            name, help=help_, description=help_[0].upper() + help_[1:] + ".", epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add(p)
        p.set_defaults(_run=run_verb)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line, no traceback (REUSE_CORE_DEBUG=1 keeps it)
        if output.debug():
            raise
        return output.fail(*output.describe(e))


if __name__ == "__main__":
    sys.exit(main())
