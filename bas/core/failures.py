"""Known failures, as opposed to bugs: what every command turns into one ``Error:`` line.

:func:`known_failure` is the one table of them, used at the error boundary of the command line
(:class:`bas.cli.BasGroup`): the machine's limits (a full disk, a file-size limit, a read-only
folder, memory, from any writer and under any library's exception class), images too large to
decode, and anything raised inside an installed plugin's code, named with the plugin and the
function it raised in.  Whatever else escapes is a bug and keeps its traceback.

Failures with a cause bas knows better where they happen (a damaged checkpoint on ``--resume``,
a run folder whose weights do not fit its family) are turned into :class:`BasError` there, with
the fix; this table is for what can come from anywhere.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Callable

from bas.core import io
from bas.core.errors import BasError, PluginError

MEMORY_FIX = (
    "ask for less at once (fewer --num-images or prompts, a smaller --width/--height or --resolution) or free memory by closing other programs"
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's ``MemoryError``, or torch's (CUDA's, or a CPU allocation that failed)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def image_too_large(exc: BaseException) -> bool:
    image = sys.modules.get("PIL.Image")
    return image is not None and isinstance(exc, image.DecompressionBombError)


def known_failure(exc: BaseException) -> BasError | None:
    """The :class:`BasError` a user should see for ``exc``, or ``None`` for a bug."""
    if isinstance(exc, BasError):
        return exc
    error = io.environment_error(exc)
    if error is not None:
        return error
    if is_out_of_memory(exc):
        return BasError(f"Out of memory ({type(exc).__name__}); {MEMORY_FIX}.")
    if image_too_large(exc):
        return BasError(f"An image is too large to open ({str(exc).rstrip('.')}, PIL's limit against decompression bombs); use a smaller image.")
    return plugin_failure(exc)


def innermost_frame(exc: BaseException, owner: Callable[[str], str | None]) -> tuple[str, str] | None:
    """``(owner, function)`` of the innermost frame of ``exc``'s traceback whose module ``owner`` names
    (it returns the owner's name for a module name, or None), or None where no frame has one."""
    found = None
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        name = owner(str(tb.tb_frame.f_globals.get("__name__", "")))
        if name is not None:
            found = (name, tb.tb_frame.f_code.co_qualname)
        tb = tb.tb_next
    return found


def plugin_failure(exc: BaseException) -> PluginError | None:
    """A :class:`PluginError` naming the installed plugin in whose code ``exc`` was raised and the
    function there (a hook implementation, or a method of a component it registered), or ``None``
    when no installed plugin's code is in the traceback.

    Hooks that bas calls are already attributed where they are called
    (:meth:`bas.core.plugins.Plugins.call_each`); the components plugins register (loss terms,
    observers, mask sources, evaluators, ...) are called from everywhere in bas, so they are
    attributed here, once, from the frames of the traceback: the innermost frame in an installed
    plugin's modules.  Built-in plugins are bas's own code: what they raise unexpectedly is a bug
    of bas and keeps its traceback.
    """
    from bas.core.plugins import installed_plugin_packages

    packages = installed_plugin_packages()
    found = innermost_frame(exc, lambda module: packages.get(module.split(".", 1)[0]))
    if found is None:
        return None
    plugin, function = found
    text = str(exc).splitlines()[0] if str(exc) else ""
    return PluginError(
        f"Plugin '{plugin}' raised in {function}: {type(exc).__name__}: {text} "
        f"(a fault of the plugin: report it to its authors, and run without --plugin {plugin} meanwhile)."
    )
