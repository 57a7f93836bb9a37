"""The lifecycle of a run's output folder (``--out``): lock, staging, swap, recovery.

A run never writes into ``--out`` while it works.  Everything it writes (checkpoints, report,
weights, ``run.json``) goes into a staging folder beside it, ``.NAME.bas-partial``.  When the run
is complete (``run.json`` written last, checkpoints removed, every file flushed to disk) the
staging folder is swapped in with renames (:func:`bas.core.io.replace_dir`): the old ``--out``
moved aside, the staging folder renamed to ``--out``, the old one deleted.  At every instant
``--out`` holds the whole old run or the whole new one.  A swap that a crash interrupted is
finished by the next command that opens the folder (``bas run``, ``generate``, ``edit``,
``export``) when the staging folder holds a complete run, and undone otherwise.

An interrupted run stays in the staging folder with its checkpoints, where ``--resume`` finds it
from the ``--out`` path; ``--out`` keeps the previous run (if any) usable meanwhile.

One process at a time works on a folder: a lock file ``.NAME.bas-lock`` beside it, created with
``O_CREAT|O_EXCL`` as git's ``index.lock``, names its process (pid, host, command, start time).
A second command fails at once with one line naming the first.  A lock whose process no longer
runs on this host (``kill -9``, power loss) is stale: the next command takes it over, with a
warning.  A lock from another host (a shared file system) cannot be checked and is reported with
the file to delete.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from bas.core import io
from bas.core.errors import BasError, command_line

STAGING_TAG = "bas-partial"
LOCK_TAG = "bas-lock"
RUN_FILE = "run.json"  # written last: its presence marks a complete run
CHECKPOINTS = "checkpoints"  # only in the staging folder: removed before the swap
MAX_NAME = 200  # the staging and lock names add 14 characters to --out's; file names stop at 255
KILL_ENV = "BAS_TEST_KILL_AT"  # tests: SIGKILL this process at the named point (see fault_point)


def fault_point(name: str) -> None:
    """Where a test may kill this process outright (``BAS_TEST_KILL_AT=name``), as a power loss would."""
    if os.environ.get(KILL_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def this_command() -> str:
    """This process's command line as a user would type it (for the lock file)."""
    if Path(sys.argv[0]).name in ("bas", "cli.py", "__main__.py"):
        return command_line("bas", *sys.argv[1:])
    return command_line(*sys.argv)


def canonical(out) -> Path:
    """The folder ``out`` names, absolute with links and ``..`` resolved: the same folder given by
    another path is the same run (its staging folder and lock are found from either)."""
    text = str(out)
    if not text.strip() or "\0" in text:
        raise BasError(f"--out must be a folder path, not {text!r}.")
    try:
        return Path(text).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links, a path too long
        raise BasError(f"--out {text} cannot be resolved ({exc}); pass a plain folder path.") from exc


def staging_path(out) -> Path:
    """Where the run for ``--out`` works until it is complete: ``.NAME.bas-partial`` beside it."""
    return io.sibling(canonical(out), STAGING_TAG)


def is_staging(path) -> bool:
    name = Path(path).name
    return name.startswith(".") and name.endswith("." + STAGING_TAG)


def looks_like_run(folder: Path) -> bool:
    """Whether ``folder`` is one bas wrote: a ``run.json`` of bas's, or a damaged one beside handles."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return False
    try:
        return "bas_version" in json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, OSError):
        return (Path(folder) / "handles.safetensors").is_file()


def replaceable(folder: Path) -> str | None:
    """``None`` when a finished run may take ``folder``'s place, else why not.

    Only a missing folder, an empty one or a bas run is ever replaced: ``--overwrite`` replaces the
    whole folder, and a folder that is not a run may hold anything of the user's.
    """
    folder = Path(folder)
    if not os.path.lexists(folder):
        return None
    if not folder.is_dir():
        return "it is a file"
    if folder.is_symlink():
        return "it is a link"
    entries = list(folder.iterdir())
    if not entries or looks_like_run(folder):
        return None
    return f"it is not a bas run (it has no run.json) and holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"


INTERNAL_NAME = re.compile(rf"\..+\.({STAGING_TAG}|{LOCK_TAG}(\.break)?|{io.OLD_TAG}|{io.TRASH_TAG}-.*)")


def option_paths(image, model, options: dict, plugin_options) -> list[tuple[str, Path]]:
    """Every file or folder a command's options name, as ``(option, path)``: the image, a local model,
    and the values of the plugin options (``click.Option``s) of click's ``Path`` type (masks, scene,
    annotations, class images, ...), whose targets ``check_target`` keeps out of harm's way."""
    import click

    found = [("--image", Path(image))] if image else []
    if model and Path(model).expanduser().exists():
        found.append(("--model", Path(model).expanduser()))
    for opt in plugin_options:
        if isinstance(opt.type, click.Path):
            value = options.get(opt.name)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v:
                    found.append((opt.opts[0], Path(v)))
    return found


def check_target(out, inputs: Iterable[tuple[str, Path]] = (), kind: str = "run", option: str = "--out") -> Path:
    """Refuse an ``--out`` that bas may not replace as a whole: the root, home or current folder
    or one above it, a file or a path below one, a name bas uses for its own work, or a folder holding any of the
    inputs (``(option, path)``).  ``kind`` names what is written (``run``, ``export``), ``option`` the
    argument that names the folder."""
    given = out
    out = canonical(out)
    if out.exists() and not out.is_dir():
        raise BasError(f"{option} {given} is a file; pass a folder path.")
    io.check_output_folder(out, option)  # a path below a file: one line now, not an error from mkdir at the end
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):
        home = None
    cwd = Path.cwd().resolve()
    what = None
    if out.parent == out:
        what = "the root folder"
    elif out == home:
        what = "your home folder"
    elif out == cwd:
        what = "the current folder"
    elif out in cwd.parents:
        what = "a parent of the current folder"
    if what:
        raise BasError(f"{option} {given} is {what}; bas replaces such a folder as a whole, so pass a folder of its own such as {kind}s/NAME.")
    if out.is_dir() and os.path.ismount(out):
        raise BasError(f"{option} {given} is a mount point, which bas cannot replace by renaming; pass a folder inside it.")
    if INTERNAL_NAME.fullmatch(out.name):
        raise BasError(f"{option} {given} is a name bas uses for its own work beside an output folder; pass the output folder's own name.")
    if len(out.name) > MAX_NAME:
        raise BasError(f"{option} {given} has a name of {len(out.name)} characters; use a name of at most {MAX_NAME}.")
    for input_option, path in inputs:
        real = canonical(path)
        if real == out or out in real.parents:
            raise BasError(f"{option} {given} holds {input_option} {path}, and bas replaces such a folder as a whole; choose a folder that holds none of the {kind}'s inputs.")
    return out


# -- the lock -------------------------------------------------------------------------------------
class LockHeld(BasError):
    """Another live process works on the folder."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which a reused pid does not share."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and brackets
    return fields[19] if len(fields) > 19 else None


def _running(pid: int, proc_start: str | None) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would stop the process on Windows: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    now = _proc_start(pid)
    return proc_start is None or now is None or now == proc_start


@dataclass
class LockHolder:
    pid: int
    host: str
    command: str
    started: str
    proc_start: str | None = None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: `{self.command}`"


class RunLock:
    """``.NAME.bas-lock`` beside ``--out``: who works on the folder now."""

    BREAK_TAG = LOCK_TAG + ".break"

    def __init__(self, out):
        self.out = canonical(out)
        self.path = io.sibling(self.out, LOCK_TAG)
        self.held = False

    def _read(self) -> tuple[bytes, LockHolder | None]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return b"", None
        try:
            data = json.loads(raw)
            return raw, LockHolder(int(data["pid"]), str(data["host"]), str(data["command"]), str(data["started"]), data.get("proc_start"))
        except (ValueError, KeyError, TypeError):
            return raw, None

    def _take_over(self, seen: bytes) -> None:
        """Remove the stale lock whose content was ``seen``, unless another process already did.

        Only one process at a time may break a lock (a second ``O_EXCL`` file), and it removes
        the lock only if it still holds what was judged stale, so two processes that both found
        the same stale lock cannot both end up holding the folder.
        """
        breaker = io.sibling(self.out, self.BREAK_TAG)
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - breaker.stat().st_mtime > 10:  # its process died while holding it
                    breaker.unlink()
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if self.path.read_bytes() == seen:
                    self.path.unlink()
        finally:
            os.close(fd)
            breaker.unlink(missing_ok=True)

    def holder(self) -> LockHolder | None:
        """Who works on the folder now: the lock's process while it runs (one on another host cannot
        be checked, so it counts as running), ``None`` for no lock, a stale one or one being written."""
        _, holder = self._read()
        if holder is None or (holder.host == socket.gethostname() and not _running(holder.pid, holder.proc_start)):
            return None
        return holder

    def acquire(self, command: str) -> None:
        info = {
            "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "proc_start": _proc_start(os.getpid()),
        }
        holder = None
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                raw, holder = self._read()
                if holder is None:
                    try:
                        age = time.time() - self.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age > 10:  # a process died between creating the lock and writing it
                        self._take_over(raw)
                    else:
                        time.sleep(0.02)  # it is being written now
                    continue
                if holder.host == info["host"] and not _running(holder.pid, holder.proc_start):
                    self._take_over(raw)
                    warnings.warn(f"Took over the lock on {self.out} left by {holder.describe()}, which no longer runs.", stacklevel=2)
                    continue
                raise LockHeld(
                    f"{self.out} is in use by another bas process ({holder.describe()}); wait for it to finish or choose another "
                    f"--out (if that process is gone, delete {self.path})."
                ) from None
            except OSError as exc:
                error = io.environment_error(exc)
                if error is None:
                    raise
                raise BasError(f"Cannot write beside --out {self.out} ({exc.strerror}: {self.path.parent}); choose an --out in a folder you can write to.") from exc
            try:
                os.write(fd, (json.dumps(info) + "\n").encode())
                os.fsync(fd)
            except OSError:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            self.held = True
            return
        who = holder.describe() if holder else "a process that did not say who it is"
        raise LockHeld(f"{self.out} is locked by {who}; if no bas command is working on it, delete {self.path}.")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# -- the folder's states --------------------------------------------------------------------------
def _complete(staging: Path) -> bool:
    return (staging / RUN_FILE).is_file()


def pending(out) -> bool:
    """Whether an interrupted swap of ``--out`` is waiting to be finished or undone."""
    out = canonical(out)
    parent = out.parent
    if not parent.is_dir():
        return False
    return (os.path.lexists(io.sibling(out, io.OLD_TAG)) or _complete(io.sibling(out, STAGING_TAG))
            or any(parent.glob(f".{out.name}.{io.TRASH_TAG}-*")))


def recover(out) -> None:
    """Finish an interrupted swap of a complete run into ``--out``, or undo it; remove garbage.

    The caller holds the folder's lock.
    """
    out = canonical(out)
    staging = io.sibling(out, STAGING_TAG)
    if _complete(staging):
        reason = replaceable(out)
        if reason is None:
            swap_in(staging, out)
            return
        if os.path.lexists(io.sibling(out, io.OLD_TAG)):
            io.recover_dir(out)
        raise BasError(f"A finished run waits in {staging} to replace {out}, but {reason}; move {out} away and run the command again.")
    io.recover_dir(out)


def swap_in(staging: Path, out: Path) -> None:
    """Put the complete run in ``staging`` in place of ``out`` (see the module's description)."""
    io.discard(staging / CHECKPOINTS, out)
    io.normalise_modes(staging)
    io.fsync_tree(staging)
    fault_point("commit:before-swap")
    io.replace_dir(staging, out, step=lambda name: fault_point(f"commit:{name}"))


def settle(out) -> None:
    """For commands that read a run: finish or undo a swap a crash interrupted, if there is one.

    Nothing happens while another process holds the lock (it finishes its own swap), or where
    the lock cannot be written (a read-only copy of a run is read as it is).
    """
    if not pending(out):
        return
    lock = RunLock(out)
    try:
        lock.acquire(f"recover {out}")
    except BasError:
        return
    try:
        recover(out)
    finally:
        lock.release()


class RunFolder:
    """The ``--out`` of one run while it works: locked, with its staging folder.

    ``open`` takes the lock and recovers an interrupted swap; ``start`` makes an empty staging
    folder; the run writes into ``staging``; ``commit`` swaps it in; ``abandon`` removes it after a
    failure unless it should be kept for ``--resume``; ``close`` releases the lock.
    """

    def __init__(self, out):
        self.given = Path(out)
        self.out = canonical(out)
        self.staging = io.sibling(self.out, STAGING_TAG)
        self.lock = RunLock(self.out)
        self._created: list[Path] = []
        self.committed = False

    @property
    def finished(self) -> bool:
        return (self.out / RUN_FILE).is_file()

    def open(self, command: str | None = None) -> "RunFolder":
        parent = self.out.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
        except (FileExistsError, NotADirectoryError) as exc:
            self.close()
            raise BasError(f"--out {self.given} cannot be created: {exc.filename} is not a folder; choose another --out.") from exc
        except OSError as exc:
            self.close()
            error = io.environment_error(exc)
            if error is None:
                raise
            raise error from exc
        if not parent.is_dir():
            raise BasError(f"--out {self.given} cannot be created: {parent} is not a folder; choose another --out.")
        try:
            self.lock.acquire(command or this_command())
            recover(self.out)
        except BaseException:
            self.close()
            raise
        return self

    def start(self) -> None:
        """An empty staging folder, in place of whatever an earlier run left there."""
        io.discard(self.staging, self.out)
        self.staging.mkdir()

    def commit(self) -> None:
        reason = replaceable(self.out)
        if reason is not None:  # something else appeared at --out while the run worked
            raise BasError(f"The finished run cannot replace {self.out}: {reason}; move it away, and the next bas command on "
                           f"{self.given} puts the run (waiting in {self.staging}) in place.")
        import signal

        with io.sigint_handler(signal.SIG_IGN):  # milliseconds of renames: finished, rather than left to the next command
            swap_in(self.staging, self.out)
            self.committed = True

    def abandon(self, keep: bool) -> None:
        """After a failure: remove the staging folder, unless ``keep`` (it holds a checkpoint) or
        it holds a complete run (the swap failed half-way: the next command finishes it)."""
        if not keep and not _complete(self.staging):
            with contextlib.suppress(OSError):
                io.discard(self.staging, self.out)

    def close(self) -> None:
        self.lock.release()
        if not self.committed:
            for folder in reversed(self._created):  # parents this run made, if nothing else went there
                with contextlib.suppress(OSError):
                    folder.rmdir()
        self._created = []

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



# -- what is where, for those who list runs ------------------------------------------------------
def own_name(path) -> str | None:
    """The ``--out`` name that one of bas's own entries beside it belongs to (``.NAME.bas-partial``,
    ``.NAME.bas-lock``, ``.NAME.bas-old``, a lock breaker or trash): ``NAME``; ``None`` for any
    other name.  Such entries are never runs of their own."""
    name = Path(path).name
    match = INTERNAL_NAME.fullmatch(name)
    return name[1:-len(match.group(1)) - 1] if match else None


OWN_ENTRIES = {STAGING_TAG: "the staging folder", LOCK_TAG: "the lock file", LOCK_TAG + ".break": "the lock breaker",
               io.OLD_TAG: "the previous run set aside during a swap"}


def check_not_own_entry(path) -> None:
    """Refuse, for commands that read a run, a path naming one of bas's own entries beside a run
    (:func:`own_name`, also through a link), with one line naming the run it belongs to."""
    given = Path(path)
    for candidate in (given, canonical(given)):
        owner = own_name(candidate)
        if owner is not None:
            tag = candidate.name[len(owner) + 2:]
            what = OWN_ENTRIES.get(tag, "a folder being deleted")
            run = given.parent / owner if candidate is given else candidate.parent / owner
            raise BasError(f"{given} is {what} that bas keeps beside the run {run}, not a run; pass {run} itself.")


@dataclass
class RunPlace:
    """Where the run for one ``--out`` stands on disk.  Read only: nothing is locked or recovered
    (a reader that then opens the run, such as :func:`bas.generation.generate.read_run`, finishes an
    interrupted swap first)."""

    out: Path  # the --out folder; it may not exist (a first run still working or interrupted)
    finished: bool  # a finished run is in place: OUT/run.json
    staging: Path | None  # the staging folder, where one exists: a run working, interrupted, or complete and not yet swapped in
    holder: LockHolder | None  # the process working on the folder now (see RunLock.holder)


def run_place(out) -> RunPlace:
    """Where the run for ``--out`` ``out`` stands (see :class:`RunPlace`)."""
    out = canonical(out)
    staging = io.sibling(out, STAGING_TAG)
    return RunPlace(out, (out / RUN_FILE).is_file(), staging if staging.is_dir() else None, RunLock(out).holder())


def run_places(folder) -> list[RunPlace]:
    """The runs in ``folder`` (one level), by ``--out`` name, sorted: each folder in it, and each run
    that so far lives only in bas's own entries (a first run working or interrupted in its staging
    folder or locked by a live process, a swap a crash interrupted).  bas's entries
    (:func:`own_name`), other hidden names and links are never listed themselves."""
    folder = canonical(folder)
    names = set()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in folder.iterdir():
            owner = own_name(entry)
            if owner is not None:
                tag = entry.name[len(owner) + 2:]
                if tag in (STAGING_TAG, io.OLD_TAG) or (tag == LOCK_TAG and RunLock(folder / owner).holder() is not None):
                    names.add(owner)  # not trash, a lock breaker or a stale lock: nothing of a run is there
            elif entry.is_dir() and not entry.is_symlink():
                names.add(entry.name)
    return [run_place(folder / name) for name in sorted(names) if not name.startswith(".")]


# -- a run folder's files agree with each other --------------------------------------------------
HASH_LIMIT = 256 * 2**20  # larger files (a full fine-tune's weights) are checked by size: hashing GBs per command costs seconds


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    """``{relative path: {"bytes": n, "sha256": hex or None}}`` of the files ``names`` lists
    (a name ending in ``/`` is a folder: every file in it)."""
    folder = Path(folder)
    found = {}
    for name in names:
        path = io.inside(folder, name.rstrip("/"), "The run's file list")
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else [path]:
            size = file.stat().st_size
            found[file.relative_to(folder).as_posix()] = {"bytes": size, "sha256": _sha256(file) if size <= HASH_LIMIT else None}
    return found


def run_contents(folder: Path) -> list[str]:
    """What a finished run folder holds, as :func:`checksums` names it: every entry but run.json
    (which records the others) and the checkpoints (removed before the swap), folders with a ``/``."""
    return sorted(e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in Path(folder).iterdir()
                  if e.name not in (RUN_FILE, CHECKPOINTS))


def _damaged(shown, rel: str, why: str) -> BasError:
    return BasError(f"{shown} is damaged or mixed: {rel} {why}; restore the folder or re-run `bas run` into a new folder.")


def verify(folder: Path, recorded, shown, sealed: Iterable[str] = ()) -> None:
    """Refuse a run folder whose files are not the ones its run.json recorded (missing, truncated,
    or from another run: a mixed folder), a recorded file that is a link (to anything), and in the
    ``sealed`` folders (every file of which the run recorded) a link or a file the run did not write."""
    if not isinstance(recorded, dict):
        raise BasError(f"{shown}/run.json is damaged (its checksums are not a table); re-run `bas run` into a new folder.")
    for rel, entry in recorded.items():
        path = io.inside(Path(folder), rel, f"{shown}/run.json")
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            raise BasError(f"{shown}/run.json is damaged (the record of {rel} is not valid); re-run `bas run` into a new folder.")
        if path.is_symlink():
            raise _damaged(shown, rel, "is a link, where its run wrote a file")
        if not path.is_file():
            raise BasError(f"{shown} is incomplete: {rel}, which its run.json lists, is missing; restore the folder or re-run `bas run`.")
        if path.stat().st_size != entry["bytes"] or (entry.get("sha256") and _sha256(path) != entry["sha256"]):
            raise _damaged(shown, rel, "is not the file its run wrote (it differs from run.json's record)")
    for name in sealed:
        if not isinstance(name, str):
            raise BasError(f"{shown}/run.json is damaged (its list of checked folders is not valid); re-run `bas run` into a new folder.")
        root = io.inside(Path(folder), name.rstrip("/"), f"{shown}/run.json")
        links = io.links_under(root) if os.path.lexists(root) else []
        if links:
            raise _damaged(shown, links[0].relative_to(folder).as_posix(), "is a link, which no run writes")
        for file in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
            rel = file.relative_to(folder).as_posix()
            if rel not in recorded:
                raise _damaged(shown, rel, "is not a file its run wrote (run.json has no record of it)")
