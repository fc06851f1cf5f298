"""The built-in plugins (named in :data:`reuse_core.plugins.BUILTIN_PLUGINS`), registered through
the same hooks as third-party ones."""
