"""reuse-core: reuse trained models and move knowledge between them.

The fused ops live in :mod:`reuse_core.ops` (functional) and :mod:`reuse_core.nn` (modules).
Plugin authors mark their hook implementations with :data:`hookimpl` (see docs/plugins.md).
``reuse_core.run(STRATEGY, **options)`` runs a strategy (:mod:`reuse_core.run`).
"""

from reuse_core.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl", "hookspec", "run"]


def __getattr__(name: str):
    # Imported on first use, so `import reuse_core` (and `reuse --help`) does not import torch.
    if name == "run":
        import importlib

        return importlib.import_module("reuse_core.run")
    raise AttributeError(f"module 'reuse_core' has no attribute {name!r}")
