"""reuse-core: reuse trained models and move knowledge between them.

The fused ops live in :mod:`reuse_core.ops` (functional) and :mod:`reuse_core.nn` (modules).
"""

__version__ = "0.1.0"
