"""Errors a user can cause, as opposed to bugs.

A :class:`BasError` carries one sentence that says what is wrong and how to fix it.  The command
line prints it without a traceback and exits non-zero; the Python API lets it propagate.
"""

import shlex


def command_line(*words) -> str:
    """A command as a user can paste it into a shell: every word quoted where it needs it (a path
    with a space or a quote stays one argument).  Every command bas prints is built here."""
    return shlex.join(str(w) for w in words)


class BasError(Exception):
    """A problem with the user's input, options or environment, with the fix in the message."""


class PluginError(BasError):
    """A plugin failed to import or raised inside a hook; the message names the plugin and hook."""
