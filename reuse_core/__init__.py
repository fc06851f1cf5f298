"""reuse-core: reuse trained models and move knowledge between them.

The fused ops live in :mod:`reuse_core.ops` (functional) and :mod:`reuse_core.nn` (modules).
Plugin authors mark their hook implementations with :data:`hookimpl` and write strategies with
:mod:`reuse_core.strategy` (see docs/plugins.md). ``reuse_core.run(STRATEGY, **options)`` runs a
strategy (:mod:`reuse_core.run`).

Importing the package imports neither torch nor the kernels: the submodules named in
:data:`__all__` load on first use, so ``import reuse_core; reuse_core.ops.distill_kl_loss(...)`` works.
"""

from reuse_core.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
_LAZY = ("backbone", "combine", "data", "engine", "nn", "ops", "plugins", "run", "store", "strategy")
__all__ = ["__version__", "hookimpl", "hookspec", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"reuse_core.{name}")
    raise AttributeError(f"module 'reuse_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
