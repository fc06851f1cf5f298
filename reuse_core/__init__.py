"""reuse-core: reuse trained models and move knowledge between them.

The fused ops live in :mod:`reuse_core.ops` (functional) and :mod:`reuse_core.nn` (modules).
Plugin authors mark their hook implementations with :data:`hookimpl` (see docs/plugins.md).
"""

from reuse_core.hookspecs import hookimpl, hookspec

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl", "hookspec"]
