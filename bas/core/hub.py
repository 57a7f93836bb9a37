"""Loading a model by hub id or local folder, with one line that says how to get it offline when it cannot be found."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from bas.core.errors import BasError, command_line


def looks_like_path(name: str) -> bool:
    """A hub id is ``owner/name``; anything else (``./x``, ``/x``, ``a/b/c``, ``x``) is meant as a folder."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1


def not_found_message(name: str, *, what: str, option: str, default: str) -> str:
    if looks_like_path(name):
        return (f"{what} folder {name} does not exist; pass a folder written by save_pretrained with {option}, or get "
                f"{default} with `{command_line('hf', 'download', default, '--local-dir', 'DIR')}` and pass {option} DIR.")
    return (f"{what} '{name}' is not in the Hugging Face cache and could not be downloaded (offline?); get it with "
            f"`{command_line('hf', 'download', name, '--local-dir', 'DIR')}` on a machine with internet and pass {option} DIR.")


def from_pretrained(load: Callable[[str], Any], name: str, *, what: str, option: str, default: str) -> Any:
    """``load(source)`` (a ``from_pretrained``) for a hub id or a local folder; a model that cannot be
    found is a :class:`BasError` naming the ``hf download`` command and the option that takes the folder."""
    from bas.core.family import check_model_files

    path = Path(name).expanduser()
    check_model_files(str(path) if path.exists() else name)  # no file from outside the folder (or the hub's cache)
    if path.exists():
        if not (path / "config.json").is_file():
            raise BasError(f"{path} is not a {what} folder (it has no config.json); pass a folder written by save_pretrained with {option}, "
                           f"or the hub id {default}.")
        source = str(path)
    elif looks_like_path(name):
        raise BasError(not_found_message(name, what=what, option=option, default=default))
    else:
        source = name
    try:
        return load(source)
    except (OSError, ValueError) as exc:
        if path.exists():
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            raise BasError(f"{path} does not hold a loadable {what} ({type(exc).__name__}: {reason}); pass a folder written by save_pretrained "
                           f"with {option}.") from exc
        raise BasError(not_found_message(name, what=what, option=option, default=default)) from exc


def check_available(name: str, *, what: str, option: str, default: str) -> None:
    """Fail now, with the same line as :func:`from_pretrained`, if the model's config cannot be found
    (a cheap check before hours of work that ends by loading it)."""
    from transformers import AutoConfig

    from_pretrained(AutoConfig.from_pretrained, name, what=what, option=option, default=default)
