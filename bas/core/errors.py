"""Errors a user can cause, as opposed to bugs.

A :class:`BasError` carries one sentence that says what is wrong and how to fix it.  The command
line prints it without a traceback and exits non-zero; the Python API lets it propagate.
"""


class BasError(Exception):
    """A problem with the user's input, options or environment, with the fix in the message."""


class PluginError(BasError):
    """A plugin failed to import or raised inside a hook; the message names the plugin and hook."""
