"""reuse-example: an example reuse-core plugin (a small residual CNN backbone)."""

__version__ = "0.1.0"
