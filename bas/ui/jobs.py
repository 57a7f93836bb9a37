"""Extractions started from the page: a queue per device, run in the background, one at a time each.

A job is a ``bas run`` command line.  It is parsed by the real ``bas run`` parser into the same
:class:`~bas.core.training.RunConfig` the command would make, and run in-process by
:func:`bas.core.training.extract` on a worker thread of its device (the CPU counts as one device, each
GPU as one), with one more plugin registered in code: :class:`Follow`, an observer that records
progress for the page.  It adds no option, so the run, its ``run.json`` and its checkpoints are the
command line's: a run started here resumes with ``bas run ... --resume`` and the other way round.

What the page shows of a job lives in its folder ``.bas-ui/jobs/ID/`` as well as in memory:
``progress.jsonl`` (a line per step), ``view.json`` (the phases' lengths, when the attention map was
drawn) and ``attention.png``, so a server started again shows the curve and the map of a job of
an earlier one.  They stay out of the run folder, which holds what ``bas run`` writes and nothing
else.

Stop asks the run to stop after the current step and save a checkpoint (:meth:`Run.request_stop`,
what Ctrl-C does); Resume queues the same command with ``--resume``.  Nothing depends on a browser
being connected: the page only reads a job's state.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bas import hookimpl
from bas.core import io
from bas.core.errors import BasError

ATTENTION_EVERY = 50  # steps between attention maps on the page (and one at the end of each phase)
RATE_WINDOW = 20  # steps over which the rate (and so the ETA) is averaged
ACTIVE = ("queued", "running", "stopping")
PROGRESS, VIEW, ATTENTION = "progress.jsonl", "view.json", "attention.png"  # the page's view of a job, in its folder


@dataclass
class Job:
    """One extraction: its command line (arguments of ``bas run``), its state and its progress."""

    id: str
    args: list[str]  # as run, with absolute paths
    shown: str  # the command line shown on the page (paths relative to the workspace)
    out: Path
    device: str
    state: str = "queued"  # queued, running, stopping, finished, interrupted, failed, cancelled
    message: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    phase: int = 0
    phase_steps: dict[int, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # {"phase", "step", "loss", "seconds", **terms}
    attention: Path | None = None  # the newest attention-map PNG
    attention_at: str = ""
    version: int = 0  # bumped on every change the page shows
    run: object | None = field(default=None, repr=False)
    stop_requested: bool = False

    def record(self) -> dict:
        return {"id": self.id, "args": self.args, "shown": self.shown, "out": str(self.out), "device": self.device, "state": self.state,
                "message": self.message, "created": self.created, "started": self.started, "ended": self.ended}

    # -- what the page shows ------------------------------------------------------------------------
    def rate(self) -> float | None:
        """Steps per second over the last steps of the current phase."""
        recent = [h for h in self.history if h["phase"] == self.phase and h["seconds"]][-RATE_WINDOW:]
        seconds = sum(h["seconds"] for h in recent)
        return len(recent) / seconds if recent and seconds > 0 else None

    def eta(self) -> float | None:
        """Seconds left at the current rate: the rest of this phase and any phase after it."""
        rate = self.rate()
        if rate is None:
            return None
        done = self.history[-1]["step"] if self.history and self.history[-1]["phase"] == self.phase else 0
        left = self.phase_steps.get(self.phase, 0) - done + sum(n for p, n in self.phase_steps.items() if p > self.phase)
        return left / rate

    def status(self, place: int | None = None) -> str:
        name = self.out.name
        if self.state == "queued":
            ahead = "next" if not place else f"{place} ahead of it"
            return f"{name}: queued on {self.device} ({ahead})"
        if self.state in ("running", "stopping"):
            if not self.phase:
                return f"{name}: loading the model and the scene on {self.device}" + (" (stopping)" if self.state == "stopping" else "")
            step = self.history[-1]["step"] if self.history and self.history[-1]["phase"] == self.phase else 0
            parts = [f"{name}: phase {self.phase} of {len(self.phase_steps)}, step {step}/{self.phase_steps[self.phase]}"]
            rate, eta = self.rate(), self.eta()
            if rate:
                parts.append(f"{rate:.2f} steps/s" if rate >= 0.1 else f"{1 / rate:.1f} s/step")
            if eta is not None:
                parts.append(f"ETA {duration(eta)}")
            if self.history:
                parts.append(f"loss {self.history[-1]['loss']:.4f}")
            return ", ".join(parts) + (" (stopping after this step)" if self.state == "stopping" else "")
        took = f" in {duration(self.ended - self.started)}" if self.ended and self.started else ""
        return f"{name}: {self.state}{took}" + (f". {self.message}" if self.message else "")


def device_key(device: str) -> str:
    """The queue a run waits in: ``cpu``, or ``cuda:N`` per GPU (``auto`` and ``cuda`` name the current one)."""
    import torch

    from bas.core.model import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    return dev.type


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Follow:
    """The in-code plugin that follows one job: an observer registered only for it, with no options."""

    def __init__(self, job: Job, directory: Path, attention_every: int = ATTENTION_EVERY):
        self.job, self.directory, self.every = job, directory, attention_every

    @hookimpl
    def bas_register_observers(self, register):
        register("ui-progress", lambda config: self, description="progress for the bas ui page")

    def on_run_start(self, run):
        self.job.run = run
        self.job.phase_steps = {p: n for p, n in ((1, run.config.phase1_steps), (2, run.config.phase2_steps)) if n}
        self.job.history = []
        (self.directory / PROGRESS).unlink(missing_ok=True)
        if self.job.stop_requested:
            run.request_stop()
        self.save_view()

    def on_phase_start(self, run, phase):
        if not self.job.history:  # a resumed run: the steps before its checkpoint (their times are not known)
            for p in (1, 2):
                for h in run.history[f"phase{p}"]:
                    self.log({"phase": p, "seconds": 0.0, **h})
        self.job.phase = phase
        self.save_view()

    def on_step(self, run, step):
        self.log({"phase": step.phase, "step": step.step, "loss": step.loss, "seconds": step.seconds, **step.terms})
        if self.every and step.step % self.every == 0 and step.step < step.total_steps:
            self.attention(run, f"phase {step.phase}, step {step.step}")

    def on_phase_end(self, run, phase):
        self.attention(run, f"end of phase {phase}")

    def log(self, entry: dict) -> None:
        """One step of the curve: in memory for the page, and a line of progress.jsonl for a later server."""
        self.job.history.append(entry)
        with open(self.directory / PROGRESS, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self.job.version += 1

    def save_view(self) -> None:
        io.write_json(self.directory / VIEW, {"phase": self.job.phase, "phase_steps": self.job.phase_steps, "attention_at": self.job.attention_at})
        self.job.version += 1

    def attention(self, run, when: str) -> None:
        """Each handle's cross-attention map over the input, as the report draws it (cheap: one forward pass)."""
        from bas.plugins.attention_loss import handle_attention_maps
        from bas.plugins.report import plot_attention

        try:
            maps = handle_attention_maps(run, res=run.config.options.get("attention_res"))
        except BasError:  # a model without layers at that size: the run itself is fine
            return
        path = self.directory / ATTENTION
        plot_attention(run.scene.image, run.scene.masks, maps, list(run.tokens), run.phase, path)  # written whole (atomic)
        self.job.attention, self.job.attention_at = path, when
        self.save_view()


class Jobs:
    """The queue of extractions, one worker thread per device, each running one job at a time."""

    def __init__(self, directory: Path, parse: Callable[[list[str]], tuple], attention_every: int = ATTENTION_EVERY):
        """``parse(args)`` turns ``bas run`` arguments into ``(RunConfig, plugin names)``."""
        self.directory = Path(directory)
        self.parse = parse
        self.attention_every = attention_every
        self.lock = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.pending: dict[str, list[str]] = {}  # device -> queued job ids, in order
        self.workers: dict[str, threading.Thread] = {}
        self.closing = False
        self.counter = itertools.count(1)
        self._recover()

    def _recover(self) -> None:
        """Jobs of an earlier server that stopped while they were queued or running: they did not finish."""
        for path in sorted(self.directory.glob("*/job.json")):
            try:
                data = json.loads(path.read_text())
                job = Job(id=data["id"], args=data["args"], shown=data["shown"], out=Path(data["out"]), device=data["device"],
                          state=data["state"], message=data.get("message", ""), created=data["created"],
                          started=data.get("started"), ended=data.get("ended"))
            except (OSError, KeyError, TypeError, json.JSONDecodeError):
                continue
            if job.state in ACTIVE:
                job.state, job.message = "interrupted", "the bas ui server stopped during this run"
                self._save(job)
            self._load_view(job)
            self.jobs[job.id] = job

    def _load_view(self, job: Job) -> None:
        """The curve and the attention map a job's folder keeps (a line cut short by a crash is skipped)."""
        folder = self.directory / job.id
        try:
            view = json.loads((folder / VIEW).read_text())
            job.phase = int(view.get("phase") or 0)
            job.phase_steps = {int(p): int(n) for p, n in (view.get("phase_steps") or {}).items()}
            job.attention_at = str(view.get("attention_at") or "")
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        try:
            lines = (folder / PROGRESS).read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and {"phase", "step", "loss"} <= entry.keys():
                job.history.append(entry)
        if (folder / ATTENTION).is_file():
            job.attention = folder / ATTENTION

    def _save(self, job: Job) -> None:
        io.write_json(self.directory / job.id / "job.json", job.record())

    # -- queries ----------------------------------------------------------------------------------
    def get(self, job_id: str | None) -> Job | None:
        return self.jobs.get(job_id or "")

    def newest(self) -> Job | None:
        return max(self.jobs.values(), key=lambda j: j.created, default=None)

    def for_out(self, out: Path) -> Job | None:
        """The newest job that writes into ``out``."""
        found = [j for j in self.jobs.values() if Path(j.out) == Path(out)]
        return max(found, key=lambda j: j.created, default=None)

    def place(self, job: Job) -> int:
        """How many jobs run or wait before ``job`` on its device."""
        with self.lock:
            queue = self.pending.get(job.device, [])
            running = any(j.state in ("running", "stopping") and j.device == job.device for j in self.jobs.values())
            return (queue.index(job.id) if job.id in queue else 0) + int(running)

    def active(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state in ACTIVE), key=lambda j: j.created)

    def check_free(self, out: Path) -> None:
        """Refuse a second job for a run a job of this server queues or runs (before any other check
        on its folder: a running run's checkpoints do not make it an interrupted one)."""
        busy = [j for j in self.jobs.values() if j.state in ACTIVE and Path(j.out) == Path(out)]
        if busy:
            raise BasError(f"{Path(out).name} is already {busy[0].state}; wait for it, stop it (its Stop button in the queue), or choose another run name.")

    # -- changes ----------------------------------------------------------------------------------
    def submit(self, args: list[str], shown: str) -> Job:
        """Queue ``bas run ARGS``; the options are parsed and checked now, so a mistake is an error at once."""
        from bas.core.plugins import Plugins
        from bas.core.training import check_run

        config, names = self.parse(args)
        check_run(config, Plugins(names))  # what `bas run` checks before it loads the model, now rather than when the job starts
        out = Path(config.out)
        device = device_key(config.device)
        with self.lock:
            if self.closing:
                raise BasError("bas ui is shutting down; start the run again after restarting it.")
            self.check_free(out)
            job = Job(id=f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self.counter)}-{uuid.uuid4().hex[:6]}", args=list(args), shown=shown, out=out, device=device)
            (self.directory / job.id).mkdir(parents=True)
            self.jobs[job.id] = job
            self.pending.setdefault(device, []).append(job.id)
            self._save(job)
            if device not in self.workers or not self.workers[device].is_alive():
                self.workers[device] = threading.Thread(target=self._work, args=(device,), name=f"bas-ui-{device}", daemon=True)
                self.workers[device].start()
            self.lock.notify_all()
        return job

    def stop(self, job: Job) -> None:
        """A queued job leaves the queue; a running one stops after its current step with a checkpoint."""
        with self.lock:
            if job.state == "queued":
                self.pending[job.device].remove(job.id)
                job.state, job.message, job.ended = "cancelled", "stopped before it started", time.time()
                self._save(job)
            elif job.state == "running":
                job.stop_requested = True
                job.state = "stopping"
                if job.run is not None:
                    job.run.request_stop()
            job.version += 1

    def forget(self, out: Path) -> None:
        """Drop the jobs that wrote into ``out`` (its run was deleted); an active one is refused."""
        with self.lock:
            self.check_free(out)
            for job in [j for j in self.jobs.values() if Path(j.out) == Path(out)]:
                del self.jobs[job.id]
                shutil.rmtree(self.directory / job.id, ignore_errors=True)

    def close(self, timeout: float = 600.0) -> None:
        """Stop what runs (each saves a checkpoint), drop the queue, and wait for the workers."""
        with self.lock:
            self.closing = True
            for job in list(self.jobs.values()):
                if job.state in ("queued", "running"):
                    self.stop(job)
            self.lock.notify_all()
        deadline = time.time() + timeout
        for worker in list(self.workers.values()):
            worker.join(max(0.0, deadline - time.time()))

    # -- the worker ---------------------------------------------------------------------------------
    def _work(self, device: str) -> None:
        while True:
            with self.lock:
                while not self.pending.get(device) and not self.closing:
                    self.lock.wait()
                if self.closing and not self.pending.get(device):
                    return
                job = self.jobs[self.pending[device].pop(0)]
                job.state, job.started = "running", time.time()
                self._save(job)
            self._run(job)
            with self.lock:
                job.ended, job.run = time.time(), None
                job.version += 1
                self._save(job)

    def _run(self, job: Job) -> None:
        from bas.core.plugins import Plugins
        from bas.core.training import Interrupted, extract

        try:
            config, names = self.parse(job.args)
            config.options["quiet"] = True  # the page shows the progress; a resume may differ in it
            plugins = Plugins(names, extra=[("ui-progress", Follow(job, self.directory / job.id, self.attention_every))])
            extract(config, plugins)
            job.state, job.message = "finished", ""
        except Interrupted as exc:
            job.state, job.message = "interrupted", str(exc).split(";")[0] + "; Resume continues it."
        except BasError as exc:
            job.state, job.message = "failed", str(exc)
        except Exception as exc:  # a bug: the page says what, the log file keeps the traceback
            (self.directory / job.id / "error.log").write_text(traceback.format_exc())
            job.state, job.message = "failed", f"{type(exc).__name__}: {exc} (traceback in {self.directory.name}/{job.id}/error.log)"
