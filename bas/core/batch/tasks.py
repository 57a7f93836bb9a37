"""What an executor runs for one scene, and the events that travel back to the batch.

An executor calls :func:`run_scene` ``(task, emit)`` wherever it runs work (a local process, a
Ray worker on another node); ``emit`` sends :class:`Started` and :class:`Progress` events back
and the return value is the scene's result, which the executor hands back as :class:`Finished`.
Everything here is plain data, so any executor can pickle it.

``run_scene`` does exactly what ``bas run`` does for the scene, through the public API: it
resumes the scene's interrupted run when ``checkpoint.complete_checkpoints`` finds one, and
follows the run with an in-process observer that forwards phase and step.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bas.core import checkpoint, io
from bas.core.errors import BasError
from bas.core.hookspecs import hookimpl

OBSERVER_PLUGIN = "batch-progress"  # the in-code plugin that follows a scene's run
PROGRESS_EVERY_S = 0.5  # at most this often a Progress event per scene (plus one per phase start)
MAX_WARNINGS = 10


@dataclass
class BatchConfig:
    """What an executor's factory gets: the batch's output folder, the runs' ``--device`` (from
    which an executor decides GPU placement) and the executor options (``bas_batch_options``)."""

    out: Path
    executor: str = "local"
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False


@dataclass
class SceneTask:
    """One scene to run: ``values`` are :func:`bas.extract`'s options for it (image, masks or
    scene, every run option) and ``plugins`` its ``--plugin`` values."""

    name: str
    out: str  # the run folder, <batch out>/<name>
    values: dict[str, Any]
    plugins: list[str]
    overwrite: bool = False  # start over: the folder holds a run made with other options
    preview: str | None = None  # where to write the input with its masks, for the gallery
    attempt: int = 1
    threads: int | None = None  # torch CPU threads for this scene; None leaves them as they are


@dataclass
class Started:
    name: str
    attempt: int
    host: str
    pid: int


@dataclass
class Progress:
    name: str
    phase: int  # 0 while loading
    step: int
    total: int
    device: str = ""


@dataclass
class Finished:
    name: str
    result: dict[str, Any]


def describe_device(device) -> tuple[str, str | None]:
    """``("cuda:0", "NVIDIA H100 80GB HBM3 (GPU 3 of the machine)")`` or ``("cpu", None)``."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return str(device), None
    name = torch.cuda.get_device_name(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",")]
        index = device.index or 0
        if index < len(ids):
            name += f" (GPU {ids[index]} of {socket.gethostname()})"
    return str(device), name


class Forwarder:
    """The in-code observer that sends a scene's phase and step to the batch, and draws the
    gallery's picture of the input with its masks once the scene is loaded."""

    def __init__(self, task: SceneTask, emit: Callable[[Any], None]):
        self.task, self.emit = task, emit
        self.device = ""
        self.gpu: str | None = None
        self.first_step: tuple[int, int] | None = None
        self.last_step: tuple[int, int] | None = None
        self.last_emit = 0.0

    @hookimpl
    def bas_register_observers(self, register):
        register(OBSERVER_PLUGIN, lambda config: self, description="sends a batch scene's phase and step to bas batch")

    def on_run_start(self, run):
        self.device, self.gpu = describe_device(run.device)
        if self.task.preview:
            try:
                write_preview(run, Path(self.task.preview))
            except Exception as exc:  # a picture for the gallery is not worth failing a scene for
                warnings.warn(f"No gallery picture for {self.task.name}: {type(exc).__name__}: {exc}", stacklevel=1)

    def on_phase_start(self, run, phase):
        total = run.config.phase1_steps if phase == 1 else run.config.phase2_steps
        done = getattr(getattr(run, "current", None), "step", 0) or 0  # > 0 in a resumed phase
        self.emit(Progress(self.task.name, phase, done, total, self.device))
        self.last_emit = time.monotonic()

    def on_step(self, run, record):
        if self.first_step is None:
            self.first_step = (record.phase, record.step)
        self.last_step = (record.phase, record.step)
        now = time.monotonic()
        if now - self.last_emit >= PROGRESS_EVERY_S or record.step == record.total_steps:
            self.last_emit = now
            self.emit(Progress(self.task.name, record.phase, record.step, record.total_steps, self.device))


def write_preview(run, path: Path) -> None:
    """The image as training sees it (square, at the training resolution) with each mask tinted,
    outlined and labelled with its handle."""
    import numpy as np
    from PIL import Image

    from bas.core.masks import render_preview

    image = ((run.scene.image.permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    masks = [m for m in run.scene.masks.float().cpu().numpy()]
    io.save_image(path, render_preview(Image.fromarray(image), masks, list(run.tokens)))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run_scene(task: SceneTask, emit: Callable[[Any], None]) -> dict[str, Any]:
    """Run one scene as ``bas run`` would and return its result (never raises for the scene's
    own failures: those are the result)."""
    from bas.core.api import make_config, run_plugins
    from bas.core.plugins import Plugins
    from bas.core.training import Interrupted, extract

    if task.threads:
        import torch

        torch.set_num_threads(task.threads)
    started = time.time()
    host, pid = socket.gethostname(), os.getpid()
    emit(Started(task.name, task.attempt, host, pid))
    out = Path(task.out)
    forwarder = Forwarder(task, emit)
    # a first attempt resumes an interrupted run it was not told to replace; a retry (after its process died) resumes
    # whatever the attempt before it saved, a run it was told to replace (--overwrite) included, and else starts as that did
    first = task.attempt <= 1
    resume = bool(checkpoint.complete_checkpoints(out)) and (not first or (not task.overwrite and not (out / "run.json").exists()))
    result: dict[str, Any] = {"status": "failed", "error": None, "traceback": None, "attempt": task.attempt, "host": host, "pid": pid,
                              "resumed": resume, "resumed_at": None, "started": started}
    with warnings.catch_warnings(record=True) as caught:
        try:
            values = dict(task.values, out=out, resume=resume, overwrite=task.overwrite)
            plugins = run_plugins(Plugins(task.plugins, extra=[(OBSERVER_PLUGIN, forwarder)]), values, task.plugins)
            emit(Progress(task.name, 0, 0, 0, ""))
            run = extract(make_config(plugins, values, task.plugins), plugins)
        except Interrupted:
            where = f" after phase {forwarder.last_step[0]} step {forwarder.last_step[1]}" if forwarder.last_step else ""
            result.update(status="interrupted", error=f"Stopped by Ctrl-C{where} with a checkpoint; running the batch again resumes it.")
        except KeyboardInterrupt:
            result.update(status="interrupted", error="Stopped by Ctrl-C before a checkpoint could be saved; the newest earlier checkpoint is kept.")
        except BasError as exc:
            result["error"] = _one_line(exc)
        except Exception as exc:  # a bug in bas or a plugin: keep the traceback for the report
            result.update(error=f"{type(exc).__name__}: {_one_line(exc)} (a bug, not bad input; the traceback is in batch.json)",
                          traceback=traceback.format_exc())
        else:
            info = run.info
            result.update(status="done", files=list(info["files"]) + ["run.json"], run_times=info.get("times", {}))
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    finished = time.time()
    result.update(device=forwarder.device or None, gpu=forwarder.gpu, finished=finished, seconds=round(finished - started, 3),
                  warnings=messages[:MAX_WARNINGS])
    if resume and forwarder.first_step is not None:
        phase, step = forwarder.first_step
        result["resumed_at"] = {"phase": phase, "step": step - 1}
    return result


def crashed(task: SceneTask, reason: str) -> dict[str, Any]:
    """The result of a task whose process died (killed, out of host memory, a lost node)."""
    now = time.time()
    return {"status": "failed", "crashed": True, "attempt": task.attempt, "started": None, "finished": now,
            "error": f"The process running this scene died ({reason}); its progress up to its newest checkpoint is kept, "
                     "and running the batch again resumes it."}


def signal_name(code: int | None) -> str:
    """``"killed by SIGKILL"`` for a negative exit code, else ``"exit code N"``."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
