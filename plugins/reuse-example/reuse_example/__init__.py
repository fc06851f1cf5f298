"""reuse-example: an example reuse-core plugin (a small residual CNN backbone, an attention-transfer strategy)."""

__version__ = "0.1.0"
