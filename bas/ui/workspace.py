"""The folder ``bas ui`` reads and writes: scenes, runs, exports, and the page's own uploads and jobs.

Every path that comes from the page goes through :meth:`Workspace.inside`, which resolves symlinks
and ``..`` and refuses anything that lands outside the workspace.  Names typed on the page (a
scene's, a run's) are checked before they become folder names.

Layout::

    WORKSPACE/scenes/NAME/     img.png, mask0.png, ..., preview.png (what `bas run --scene` reads), scene.json
    WORKSPACE/runs/NAME/       `bas run` output folders
    WORKSPACE/exports/         `bas export` folders and their zips
    WORKSPACE/.bas-ui/uploads/ files uploaded from the page (gradio's upload folder)
    WORKSPACE/.bas-ui/jobs/ID/ one extraction started from the page: job.json, attention.png
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

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
    """A run folder of the workspace as the runs list shows it."""

    name: str
    path: Path
    status: str  # finished, interrupted, failed, or a job's state (queued, running, stopping)
    info: dict | None  # run.json of a finished run
    note: str = ""
    steps: str = ""


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

    def run_folders(self) -> list[Path]:
        return sorted(p for p in (self.root / RUNS).iterdir() if p.is_dir() and not p.name.startswith("."))

    def finished_runs(self) -> list[str]:
        return [self.relative(p) for p in self.run_folders() if (p / "run.json").is_file()]

    def run_entry(self, folder: Path, job_state: str | None = None, job_error: str = "") -> RunEntry:
        """The status of a run folder: a job's live state wins, then run.json, then checkpoints."""
        info = None
        if (folder / "run.json").is_file():
            try:
                info = json.loads((folder / "run.json").read_text())
            except (OSError, json.JSONDecodeError):
                return RunEntry(folder.name, folder, "failed", None, "run.json cannot be read")
        if job_state in ("queued", "running", "stopping"):
            return RunEntry(folder.name, folder, job_state, info)
        if info is not None:
            return RunEntry(folder.name, folder, "finished", info)
        if complete_checkpoints(folder):
            return RunEntry(folder.name, folder, "interrupted", None, job_error or "resumable from its newest checkpoint")
        return RunEntry(folder.name, folder, "failed", None, job_error or "no run.json and no checkpoint")

    def export_dir(self, run_name: str, fmt: str) -> Path:
        return self.inside(Path(EXPORTS) / f"{check_name(run_name, 'run')}-{fmt}")
