"""Executor `local` of bas batch: worker processes on this machine, one scene at a time each.

--workers N processes, each pinned to its own GPU when there are GPUs, sharing the CPU threads
when there are none.  Each worker has its own pipe to the batch, so a worker killed mid-message
cannot garble another's."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait

import click

from bas import hookimpl
from bas.core.batch.tasks import BatchConfig, Finished, SceneTask, crashed, run_scene, signal_name
from bas.core.errors import BasError

STOP_WAIT_S = 10.0  # how long close() lets an idle worker exit before terminating it


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (ids or UUIDs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _watch_parent(parent: int) -> None:
    """Exit when the batch process is gone, rather than train on for nobody."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def worker_main(conn, parent: int, threads: int) -> None:
    """A worker process: run the scenes the batch sends, one at a time, until it sends None."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # a terminal's Ctrl-C goes to the batch, which forwards it once
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    import torch

    from bas.core.compat import quiet_libraries as _quiet_libraries

    _quiet_libraries()  # as in `bas run`: the batch reports what matters, library chatter would garble it

    torch.set_num_threads(threads)
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            result = run_scene(task, conn.send)
            conn.send(Finished(task.name, result))
    except (EOFError, OSError, KeyboardInterrupt):
        return


@dataclass
class Worker:
    index: int
    gpu: str | None
    process: multiprocessing.Process | None = None
    conn: object = None
    task: SceneTask | None = None


class LocalExecutor:
    def __init__(self, config: BatchConfig):
        self.workers = config.options.get("workers")
        if self.workers is not None and self.workers < 1:
            raise BasError(f"--workers must be 1 or more, not {self.workers}.")
        self.device = config.device
        self.queue: deque[SceneTask] = deque()
        self.pool: list[Worker] = []
        self.context = multiprocessing.get_context("spawn")  # CUDA and torch's threads do not survive fork
        self.events: list = []

    def open(self, num_tasks: int) -> None:
        import torch

        # --device cpu: no GPU; cuda:N names one GPU for every worker; auto/cuda: one GPU per worker
        gpus = visible_gpus() if self.device in ("auto", "cuda") else []
        count = self.workers or max(1, len(gpus))
        count = max(1, min(count, num_tasks))
        self.threads = max(1, torch.get_num_threads() // count)
        self.pool = [Worker(i, gpus[i % len(gpus)] if gpus else None) for i in range(count)]

    def _start(self, worker: Worker) -> None:
        parent_conn, child_conn = self.context.Pipe(duplex=True)
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if worker.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = worker.gpu
        elif self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # nothing in the worker initialises a GPU it will not use
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # a spawned process starts with the environment of this moment
        try:
            process = self.context.Process(target=worker_main, args=(child_conn, os.getpid(), self.threads),
                                           name=f"bas-batch-worker-{worker.index}", daemon=True)
            process.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child_conn.close()
        worker.process, worker.conn = process, parent_conn

    def submit(self, task: SceneTask) -> None:
        self.queue.append(task)
        self._dispatch()

    def _dispatch(self) -> None:
        for worker in self.pool:
            if not self.queue:
                return
            if worker.task is None:
                if worker.process is None:
                    self._start(worker)
                task = self.queue.popleft()
                task.threads = self.threads
                worker.task = task
                try:
                    worker.conn.send(task)
                except (BrokenPipeError, OSError):
                    pass  # the worker died; poll() sees its sentinel and reports the task

    def poll(self, timeout: float) -> list:
        live = [w for w in self.pool if w.process is not None]
        ready = set(wait([w.conn for w in live] + [w.process.sentinel for w in live], timeout)) if live else set()
        if not live:
            time.sleep(timeout)
        events = []
        for worker in live:
            if worker.conn in ready:
                self._drain(worker, events)
            if worker.process.sentinel in ready or not worker.process.is_alive():
                self._drain(worker, events)
                worker.process.join(1.0)
                if worker.task is not None:
                    events.append(Finished(worker.task.name, crashed(worker.task, signal_name(worker.process.exitcode))))
                    worker.task = None
                worker.conn.close()
                worker.process, worker.conn = None, None
        self._dispatch()
        return events

    def _drain(self, worker: Worker, events: list) -> None:
        try:
            while worker.conn.poll():
                event = worker.conn.recv()
                events.append(event)
                if isinstance(event, Finished):
                    worker.task = None
        except (EOFError, OSError):
            pass

    def interrupt(self) -> None:
        self.queue.clear()
        for worker in self.pool:
            if worker.task is not None and worker.process is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGINT)

    def close(self) -> None:
        self.queue.clear()
        for worker in self.pool:
            if worker.process is None:
                continue
            if worker.task is None:
                try:
                    worker.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + STOP_WAIT_S
        for worker in self.pool:
            if worker.process is None:
                continue
            if worker.task is None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(5.0)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
            worker.conn.close()
            worker.process = worker.conn = None


@hookimpl
def bas_register_executors(register):
    register("local", LocalExecutor, description="worker processes on this machine, one per GPU or sharing the CPU")


@hookimpl
def bas_batch_options():
    return [click.Option(["--workers"], type=int, default=None,
                         help="Scenes at a time on this machine (executor local) [default: one per GPU, else 1].")]
