"""The folder ``bas ui`` reads and writes: scenes, runs, exports, and the page's own uploads and jobs.

Every path that comes from the page goes through :meth:`Workspace.inside`, which resolves symlinks
and ``..`` and refuses anything that lands outside the workspace.  Names typed on the page (a
scene's, a run's) are checked before they become folder names.

Layout::

    WORKSPACE/scenes/NAME/     img.png, mask0.png, ..., preview.png (what `bas run --scene` reads), scene.json
    WORKSPACE/runs/NAME/       `bas run` output folders (a run working or interrupted lives in runs/.NAME.bas-partial/
                               until it completes: bas.core.runfolder; the runs list shows it as runs/NAME)
    WORKSPACE/exports/         `bas export` folders and their zips
    WORKSPACE/.bas-ui/uploads/ files uploaded from the page (gradio's upload folder)
    WORKSPACE/.bas-ui/jobs/ID/ one extraction started from the page: job.json, attention.png
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bas.core import io, runfolder
from bas.core.checkpoint import complete_checkpoints
from bas.core.errors import BasError
from bas.core.scene import find_scene_files

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SCENES, RUNS, EXPORTS, STATE = "scenes", "runs", "exports", ".bas-ui"


def check_name(name: str, what: str) -> str:
    """A scene or run name typed on the page: letters, digits, '.', '_', '-', not starting with a dot."""
    name = (name or "").strip()
    if not NAME.fullmatch(name):
        raise BasError(f"'{name}' is not a usable {what} name; use letters, digits, '.', '_' and '-' (such as toys-1).")
    return name


@dataclass
class RunEntry:
    """A run of the workspace as the runs list shows it, by its ``--out`` folder (``path``, which
    need not exist yet: a first run works and stays, when interrupted, in its staging folder)."""

    name: str
    path: Path
    status: str  # finished, interrupted, running (another process), failed, or a job's state (queued, running, stopping)
    info: dict | None  # run.json of the finished run in place
    note: str = ""
    steps: str = ""
    staging: Path | None = None  # where the run working or interrupted writes (bas.core.runfolder)

    @property
    def report(self) -> Path:
        """The report to show: the finished run's, or while a run works or after it stopped, the one it writes."""
        if self.status != "finished" and self.staging is not None and (self.staging / "report").is_dir():
            return self.staging / "report"
        return self.path / "report"


class Workspace:
    def __init__(self, root: Path):
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise BasError(f"--workspace {root} is a file; pass a folder (it is created if missing).")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        for sub in (SCENES, RUNS, EXPORTS, f"{STATE}/uploads", f"{STATE}/jobs", f"{STATE}/tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def uploads(self) -> Path:
        return self.root / STATE / "uploads"

    @property
    def jobs(self) -> Path:
        return self.root / STATE / "jobs"

    @property
    def tmp(self) -> Path:
        return self.root / STATE / "tmp"

    def inside(self, path: str | Path) -> Path:
        """``path`` (relative paths are taken from the workspace) resolved; an error if it leaves the workspace."""
        text = str(path).strip()
        if not text:
            raise BasError("An empty path was given; pick a file or folder inside the workspace.")
        candidate = Path(text).expanduser()
        resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise BasError(f"{text} is outside the workspace {self.root}; bas ui only reads and writes inside it (start it with --workspace to use another folder).")
        return resolved

    def relative(self, path: Path) -> str:
        """How a path inside the workspace is written on the page and in commands (relative to the workspace)."""
        return Path(path).resolve().relative_to(self.root).as_posix() or "."

    # -- scenes ----------------------------------------------------------------------------------
    def scene_dir(self, name: str) -> Path:
        return self.inside(Path(SCENES) / check_name(name, "scene"))

    def scenes(self) -> list[str]:
        """Scene folders (relative paths): ``scenes/*`` and other folders of the workspace in the reference layout."""
        found = []
        for folder in sorted({*self.root.glob(f"{SCENES}/*"), *self.root.glob("*"), *self.root.glob("*/*")}):
            if folder.is_dir() and not folder.name.startswith(".") and STATE not in folder.parts and self.is_scene(folder):
                found.append(self.relative(folder))
        return sorted(set(found), key=lambda p: (not p.startswith(SCENES + "/"), p))

    @staticmethod
    def is_scene(folder: Path) -> bool:
        try:
            find_scene_files(folder)
        except BasError:
            return False
        return True

    def scene_info(self, folder: Path) -> dict:
        """What the page saved beside a scene (init words, prompts); empty for other scenes."""
        path = Path(folder) / "scene.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            return {}

    # -- runs -------------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return self.inside(Path(RUNS) / check_name(name, "run"))

    def run_path(self, path: str | Path) -> Path:
        """A run picked or typed on the page: inside the workspace, and a run's own folder, never one
        of the entries bas keeps beside it (its staging folder, lock, the old run moved aside)."""
        resolved = self.inside(path)
        owner = runfolder.own_name(resolved)
        if owner is not None:
            raise BasError(f"{path} is where bas keeps its own work for the run {owner}; pick the run itself ({self.relative(resolved.parent / owner)}).")
        return resolved

    def run_folders(self) -> list[Path]:
        """The ``--out`` folders of ``runs/``: finished runs, and runs working or interrupted in their
        staging folders (bas's own entries are never listed as runs)."""
        return [place.out for place in runfolder.run_places(self.root / RUNS)]

    def finished_runs(self) -> list[str]:
        return [self.relative(place.out) for place in runfolder.run_places(self.root / RUNS) if place.finished]

    def run_entry(self, folder: Path, job_state: str | None = None, job_error: str = "") -> RunEntry:
        """The status of the run for the ``--out`` ``folder``: a job's live state wins, then another
        process working on it, then an interrupted run's checkpoints (even where a finished run is
        still in place: the run that replaces it stopped), then run.json."""
        try:
            runfolder.settle(folder)  # a swap a crash interrupted: finished (or undone), as any reader does
            problem = ""
        except BasError as exc:  # a finished run waits beside a folder it may not replace: the message says what to do
            problem = str(exc)
        place = runfolder.run_place(folder)
        name, folder = place.out.name, place.out

        def entry(status, info=None, note=""):
            return RunEntry(name, folder, status, info, note, staging=place.staging)

        if problem:
            return entry("failed", None, problem)

        info = None
        if place.finished:
            try:
                info = json.loads(io.inside(folder, "run.json", str(folder)).read_text())  # never a file a link leads to elsewhere
            except (OSError, json.JSONDecodeError, BasError):
                return entry("failed", None, "run.json cannot be read")
        if job_state in ("queued", "running", "stopping"):
            return entry(job_state, info)
        if place.holder is not None:
            return entry("running", info, f"being written by {place.holder.describe()}")
        if complete_checkpoints(folder):
            kept = "; the finished run it replaces stays usable until it completes" if info is not None else ""
            return entry("interrupted", None, (job_error or "resumable from its newest checkpoint") + kept)
        if info is not None:
            return entry("finished", info)
        return entry("failed", None, job_error or "no run.json and no checkpoint")

    def delete_run(self, out: Path) -> None:
        """Delete the run for ``out``: its folder and its staging folder, under the run's lock (so
        never one a process is writing), and only a folder that is a bas run."""
        from bas.core import io

        place = runfolder.run_place(out)
        if os.path.lexists(place.out) and runfolder.replaceable(place.out) is not None:
            raise BasError(f"{self.relative(place.out)} is not a bas run ({runfolder.replaceable(place.out)}); bas ui deletes only runs.")
        lock = runfolder.RunLock(place.out)
        lock.acquire("bas ui: delete the run")
        try:
            io.discard(io.sibling(place.out, runfolder.STAGING_TAG), place.out)
            io.discard(place.out)
        finally:
            lock.release()

    def export_dir(self, run_name: str, fmt: str) -> Path:
        return self.inside(Path(EXPORTS) / f"{check_name(run_name, 'run')}-{fmt}")
