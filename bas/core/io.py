"""Atomic, durable output: every final name appears only once its content is complete and on disk.

Files and folders are written under a temporary name in the same directory, flushed to disk
(``fsync``) and then renamed with ``os.replace``, which is atomic on POSIX and Windows, so an
interrupted command never leaves a truncated file under a name a user or a loader would trust.

A folder cannot be replaced by one rename, so :func:`replace_dir` moves the old one aside first
(``.NAME.bas-old``), renames the new one in and then deletes the old one; :func:`recover_dir`,
called before the next write of the same folder, finishes or rolls back a replacement that a
crash interrupted.  Everything written gets the usual permissions (``0666 & ~umask`` for files,
``0777 & ~umask`` for folders), whatever the library that wrote it chose.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from bas.core.errors import BasError

OLD_TAG = "bas-old"  # a folder moved aside while its replacement is renamed in
TRASH_TAG = "bas-trash"  # a folder being deleted; whatever it still holds is garbage


def sibling(final: Path, tag: str) -> Path:
    """``DIR/.NAME.TAG`` beside ``DIR/NAME``: hidden, and on the same file system (renames stay atomic)."""
    final = Path(final)
    return final.parent / f".{final.name}.{tag}"


def current_umask() -> int:
    try:  # Linux says it without changing it (changing it is not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalise_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would.

    ``mkstemp``/``mkdtemp`` create owner-only entries and safetensors writes its files ``0600``;
    outputs are shared like any other file the user makes.
    """
    mask = current_umask()
    root = Path(root)
    entries = [root] + (list(root.rglob("*")) if root.is_dir() else [])
    for path in entries:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            continue
        if stat.S_ISDIR(mode):
            os.chmod(path, 0o777 & ~mask)
        else:
            os.chmod(path, (0o777 if mode & 0o111 else 0o666) & ~mask)


def fsync_path(path: Path) -> None:
    """Flush a file's content (or a folder's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return  # Windows cannot open folders; their entries are durable there anyway
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # file systems that cannot sync folders
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under ``root``, then every folder bottom-up, then ``root``'s parent."""
    root = Path(root)
    if root.is_dir():
        for folder, _dirs, files in os.walk(root, topdown=False):
            for name in files:
                if not os.path.islink(os.path.join(folder, name)):
                    fsync_path(Path(folder, name))
            fsync_path(Path(folder))
    else:
        fsync_path(root)
    fsync_path(root.parent)


def discard(path: Path, owner: Path | None = None) -> None:
    """Delete ``path`` so that a crash half-way leaves only a name marked as garbage
    (``.OWNER.bas-trash-*``, which :func:`recover_dir` of ``owner`` removes)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    trash = sibling(owner or path, f"{TRASH_TAG}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def replace_dir(src: Path, final: Path, step: Callable[[str], None] = lambda name: None) -> None:
    """Put the complete folder ``src`` in place of ``final`` (which may not exist).

    At every instant ``final`` is the whole old folder, absent with the old one whole at
    ``.NAME.bas-old``, or the whole new one.  ``step(name)`` is called after each rename (tests
    stop the process there).
    """
    src, final = Path(src), Path(final)
    old = sibling(final, OLD_TAG)
    if os.path.lexists(old):  # a replacement interrupted earlier: it must not be taken for ours
        recover_dir(final)
    if os.path.lexists(final):
        os.replace(final, old)
        fsync_path(final.parent)
        step("old-aside")
    os.replace(src, final)
    fsync_path(final.parent)
    step("new-in")
    discard(old, final)


def recover_dir(final: Path, complete: Path | None = None) -> None:
    """Finish or undo an interrupted :func:`replace_dir` of ``final``; remove its garbage.

    With ``final`` present, a folder left aside is the old one: it goes.  With ``final`` absent,
    the replacement is finished from ``complete`` (a finished new folder) when given and present,
    and otherwise rolled back: the old folder returns.
    """
    final = Path(final)
    parent = final.parent
    if parent.is_dir():
        for trash in parent.glob(f".{final.name}.{TRASH_TAG}-*"):
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)
    old = sibling(final, OLD_TAG)
    if not os.path.lexists(old):
        return
    if os.path.lexists(final):
        discard(old, final)
    elif complete is not None and Path(complete).is_dir():
        os.replace(complete, final)
        fsync_path(parent)
        discard(old, final)
    else:
        os.replace(old, final)
        fsync_path(parent)


NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}  # os.link where links are not made


def _place_once(tmp: Path, final: Path) -> None:
    """Put the file ``tmp`` at ``final`` only where nothing is there: :class:`FileExistsError` otherwise, whoever
    was first (a hard link never replaces a file, where a rename would)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as exc:  # a filesystem without hard links (FAT, some network mounts): claim the name, then fill it whole
        if exc.errno not in NO_LINKS:
            raise
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))  # refuses an existing path
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(final: Path, *, directory: bool = False, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success flush it to disk and rename it to ``final``.

    On an exception the temporary is removed and ``final`` keeps whatever it held before.  ``exclusive`` (a
    file): only where nothing is at ``final`` yet; of two writers racing, the second gets :class:`FileExistsError`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        recover_dir(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        normalise_modes(tmp)
        if directory:
            fsync_tree(tmp)
            replace_dir(tmp, final)
        else:
            fsync_path(tmp)
            if exclusive:
                _place_once(tmp, final)
                tmp.unlink(missing_ok=True)  # the link's other name
            else:
                os.replace(tmp, final)
            fsync_path(final.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def create_json(path: Path, data) -> None:
    """Write ``path`` as :func:`write_json` does, only where nothing is there yet (``atomic_path(exclusive=True)``):
    of two writers racing for the same path, the first wins and the second gets :class:`FileExistsError`."""
    with atomic_path(path, exclusive=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as exc:  # safetensors' SafetensorError for a full disk: an OSError by another name
            error = os_error(exc)
            if error is None:
                raise
            raise OSError(error.errno, error.strerror, str(path)) from exc


# the PNG text chunk bas writes into each image `bas generate` and `bas edit` make: how a later
# command knows which same-name images it may replace (those it wrote, never a user's file)
IMAGE_RECORD = "bas"


def save_image(path: Path, image, record: dict | None = None) -> None:
    """Save a PIL image atomically; the format comes from the final name's suffix.  ``record`` (a
    PNG's): kept as its :data:`IMAGE_RECORD` text chunk, JSON (what made the image)."""
    kwargs = {}
    if record is not None:
        from PIL.PngImagePlugin import PngInfo

        kwargs["pnginfo"] = PngInfo()
        kwargs["pnginfo"].add_text(IMAGE_RECORD, json.dumps(record, ensure_ascii=False))
    with atomic_path(path) as tmp:
        image.save(tmp, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"), **kwargs)


def written_by_bas(path: Path) -> bool:
    """``path`` is a plain PNG file (not a link) holding bas's :data:`IMAGE_RECORD`."""
    from PIL import Image

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder opens too
        os.close(fd)
        return False
    with os.fdopen(fd, "rb") as file:
        try:
            with Image.open(file) as image:  # the chunk precedes the pixels: nothing is decoded
                return image.format == "PNG" and IMAGE_RECORD in image.info
        except Exception:  # not an image, damaged, too large: not one bas wrote
            return False


def check_images_replaceable(paths: list[Path], option: str) -> None:
    """Refuse, before anything is sampled, to write an image where a file bas did not write has its
    name: an earlier image of bas is replaced (the same prompt and seed made again), anything else
    (a user's file, a link, a folder) never."""
    for path in paths:
        if os.path.lexists(path) and not written_by_bas(path):
            raise BasError(
                f"{path.parent} already holds {path.name}, which bas did not write (bas never replaces a file it did not write); "
                f"move it away or pass another {option}."
            )


# -- errors of the environment, and names that come from files -----------------------------------
ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than this file system allows",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EMFILE: "too many files are open",
    errno.EBUSY: "it is in use (or a mount point)",
}


RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error ends its message


def os_error(exc: BaseException) -> OSError | None:
    """``exc`` as the ``OSError`` it is: itself, or for a library written in Rust, which raises its own
    exception class with the operating system's error in the message (safetensors' ``SafetensorError``:
    ``Error while serializing: I/O error: No space left on device (os error 28)``), an ``OSError`` of
    that errno; ``None`` for anything else."""
    if isinstance(exc, OSError):
        return exc
    if not isinstance(exc, Exception):
        return None
    found = RUST_IO_ERROR.search(str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def environment_error(exc: BaseException) -> BasError | None:
    """A :class:`BasError` for an ``OSError`` the user's machine caused (full disk, read-only
    folder, permissions), also where a library reports one under its own exception class
    (:func:`os_error`), or ``None`` for any other exception (a bug, which keeps its traceback)."""
    exc = os_error(exc)
    if exc is None or exc.errno not in ENVIRONMENT_ERRORS:
        return None
    where = exc.filename or "a file"
    fix = {
        errno.ENOSPC: "free some space or write to another disk",
        errno.EDQUOT: "free some space or write to another disk",
        errno.EROFS: "write to a folder on a writable disk",
        errno.EACCES: "write to a folder you may write to, or fix its permissions",
        errno.EPERM: "write to a folder you may write to, or fix its permissions",
    }.get(exc.errno, "write to another folder")
    return BasError(f"Could not write {where}: {ENVIRONMENT_ERRORS[exc.errno]} ({exc.strerror}); {fix}.")


def check_output_folder(path: Path, option: str) -> Path:
    """Refuse, before anything slow runs, a folder to write files into that cannot be one: a file,
    or a path below a file."""
    path = Path(path)
    for folder in (path, *path.parents):
        if os.path.lexists(folder) and not folder.is_dir():
            where = "is a file" if folder == path else f"is below {folder}, which is a file"
            raise BasError(f"{option} {path} {where}; pass a folder path.")
    return path


def check_output_file(path: Path, option: str) -> Path:
    """Refuse, before anything slow runs, a file path to write that cannot be one: a folder, or a
    path below a file (what ``write_json`` would only find out at the end)."""
    path = Path(path)
    if path.is_dir():
        raise BasError(f"{option} {path} is a folder; pass the path of the file to write.")
    check_output_folder(path.parent, f"The folder of {option}")
    return path


def inside(base: Path, relative: str, what: str) -> Path:
    """``base / relative`` for a relative path read from a file, refusing one that leaves ``base``
    (absolute, ``..``, a drive, a link pointing outside)."""
    text = str(relative)
    pure = PurePosixPath(text.replace("\\", "/"))
    if not text or "\0" in text or pure.is_absolute() or ".." in pure.parts or ":" in text:
        raise BasError(f"{what} names the path {text!r}, which is not inside {base}; the file is damaged or was made by hand, re-create it with bas.")
    path = Path(base, *pure.parts)
    real_base = Path(base).resolve()
    if real_base != path.resolve() and real_base not in path.resolve().parents:
        raise BasError(f"{what} names {text!r}, which leads outside {base} (through a link); re-create it with bas.")
    return path


def links_under(root: Path) -> list[Path]:
    """Every symbolic link at or under ``root`` (links to folders are not followed)."""
    root = Path(root)
    if root.is_symlink():
        return [root]
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        found += [Path(folder, name) for name in dirs + files if os.path.islink(os.path.join(folder, name))]
    return sorted(found)


def copy_file(src: Path, dst: Path, what: str) -> None:
    """Copy the regular file ``src`` to ``dst``, never through a link: a link (to anything, anywhere)
    in ``src``'s place is refused, also one put there after a check (``O_NOFOLLOW``)."""
    src, dst = Path(src), Path(dst)
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP or src.is_symlink():
            raise BasError(f"{what} {src} is a link, which bas never copies (it could lead to any file); re-create the folder with bas.") from None
        raise
    with os.fdopen(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise BasError(f"{what} {src} is not a plain file; re-create the folder with bas.")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "xb") as target:
            shutil.copyfileobj(source, target, 1 << 20)


def copy_tree(src: Path, dst: Path, what: str) -> None:
    """Copy the folder ``src`` to the new folder ``dst``: plain files and folders only; a link anywhere
    in it is refused before anything is copied (and each file is opened without following links)."""
    src, dst = Path(src), Path(dst)
    links = links_under(src)
    if links:
        raise BasError(f"{what} {src} holds the link {links[0]}, which bas never copies (it could lead to any file); re-create the folder with bas.")
    for folder, _dirs, files in os.walk(src, followlinks=False):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            copy_file(Path(folder, name), target / name, what)


@contextlib.contextmanager
def sigint_handler(handler):
    """Ctrl-C calls ``handler`` (a ``signal`` handler, or ``signal.SIG_IGN``) inside the block, as before
    after it. Signals reach only the main thread, so elsewhere the block runs as is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
