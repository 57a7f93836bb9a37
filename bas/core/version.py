"""bas's version, in core so that core and the verbs can record it without importing the package ``bas`` above them.

``pyproject.toml`` reads it from here statically (without importing bas), and ``bas.__version__`` is this."""

__version__ = "0.2.0.dev0"
