"""The benchmarks' command lines print a user's error as bas's own commands do: one ``Error: ...`` line.

Every benchmark's click command is made with ``cls=Command``: what click refuses (an unknown option, a value
out of range) and every :class:`click.ClickException` are click's own one line; a known failure raised anywhere
in the command, its options' callbacks included (a :class:`bas.core.errors.BasError` such as an unknown
``--device``, a full disk, out of memory: :func:`bas.core.failures.known_failure`), becomes one
``Error: ...`` line with exit status 1 too, under ``python -m benchmarks.NAME`` and click's test runner alike.
Whatever else escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from contextlib import contextmanager

import click


@contextmanager
def one_line():
    """Turn a known failure raised inside into a :class:`click.ClickException` (``Error: ...``, exit status 1)."""
    from bas.core.failures import known_failure

    try:
        yield
    except click.ClickException:
        raise
    except Exception as exc:
        error = known_failure(exc)
        if error is None:  # a bug keeps its traceback
            raise
        raise click.ClickException(str(error)) from None


class Command(click.Command):
    """A click command whose known failures are one ``Error: ...`` line (see the module's docstring)."""

    def parse_args(self, ctx, args):
        with one_line():  # an option's callback
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with one_line():
            return super().invoke(ctx)


def json_kind(value) -> str:
    """What a JSON value is, in the words of JSON (for a message about a file a person may have edited): ``a list``, ..."""
    if isinstance(value, bool):
        return "true or false"
    for kind, words in ((dict, "an object"), (list, "a list"), (str, "a string"), ((int, float), "a number")):
        if isinstance(value, kind):
            return words
    return "null" if value is None else type(value).__name__
