"""Executor `ray` of bas batch: one Ray task per scene, on a Ray cluster or a local Ray.

Ray schedules each task with --gpus-per-scene GPUs and --cpus-per-scene cores, on the cluster
--ray-address names (auto, HOST:PORT or ray://HOST:PORT) or on a Ray started on this machine;
progress comes back through an actor."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from urllib.parse import urlparse

import click

from bas import hookimpl
from bas.core.batch.tasks import BatchConfig, Finished, SceneTask, crashed, run_scene
from bas.core.errors import BasError

INSTALL_HINT = "pip install 'bas[ray]'"
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise BasError(f"--executor ray needs Ray, which is not installed; install it with: {INSTALL_HINT}") from None
    return ray


def check_reachable(address: str) -> None:
    """Fail in seconds with one line where Ray itself would retry an unreachable address for minutes."""
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host:
        raise BasError(f"--ray-address {address} is not an address; pass auto, HOST:PORT (a cluster's head, port 6379) or ray://HOST:10001.")
    if port is None:
        port = 10001 if parsed.scheme == "ray" else 6379
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise BasError(f"Cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check that `ray start --head` runs there "
                       "and that the port is open from this machine.") from None


class Inbox:
    """The Ray actor that collects the tasks' events for the batch (it needs no CPU)."""

    def __init__(self):
        self.events = []

    def put(self, event) -> None:
        self.events.append(event)

    def drain(self) -> list:
        events, self.events = self.events, []
        return events


def run_task(task: SceneTask, inbox, cpu_only: bool) -> dict:
    """The Ray task: one scene, its events sent to the batch's inbox actor.

    The calls are not waited for: a task blocked in ``ray.get`` lends its CPU to another task,
    and Ray would then run more scenes at once than --cpus-per-scene allows.  Calls from one task
    arrive in order."""
    if cpu_only and os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Ray gave this task no GPU: do not take one anyway
    return run_scene(task, inbox.put.remote)


class RayExecutor:
    def __init__(self, config: BatchConfig):
        o = config.options
        self.address = o.get("ray_address")
        self.gpus = o.get("gpus_per_scene")
        self.cpus = o.get("cpus_per_scene") or 1.0
        for name, value in (("--gpus-per-scene", self.gpus), ("--cpus-per-scene", self.cpus)):
            if value is not None and value < 0:
                raise BasError(f"{name} must be 0 or more, not {value}.")
        self.device = config.device
        self.refs: dict = {}
        self.owned = False
        self.inbox = None

    def open(self, num_tasks: int) -> None:
        ray = import_ray()
        if ray.is_initialized():  # a caller (a notebook, a test) connected already: use its cluster
            self.owned = False
        else:
            if self.address and self.address != "auto":
                check_reachable(self.address)
            options = {"logging_level": logging.ERROR, "log_to_driver": False}  # the batch reports each scene itself
            if not self.address:
                options["include_dashboard"] = False  # a Ray of our own, for this batch only
            try:
                ray.init(address=self.address or None, **options)
            except ConnectionError as exc:
                raise BasError(f"Cannot reach a Ray cluster at {self.address} ({str(exc).splitlines()[0]}); start one with "
                               "`ray start --head`, or leave out --ray-address to run on a Ray started on this machine.") from None
            self.owned = True
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        if self.gpus is None:
            self.gpus = 1 if cluster_gpus and self.device != "cpu" else 0
        if self.gpus and not cluster_gpus and not self.address:
            raise BasError(f"--gpus-per-scene {self.gpus:g} but this machine's Ray has no GPU; pass --gpus-per-scene 0 to run on the CPU.")
        self.inbox = ray.remote(Inbox).options(num_cpus=0).remote()
        self.remote = ray.remote(run_task)
        # retries are the batch's (--retries), the same for every executor
        self.task_options = {"num_gpus": self.gpus, "num_cpus": self.cpus, "max_retries": 0}

    def submit(self, task: SceneTask) -> None:
        task.threads = max(1, math.ceil(self.cpus))
        ref = self.remote.options(name=f"bas batch: {task.name}", **self.task_options).remote(task, self.inbox, not self.gpus)
        self.refs[ref] = task

    def poll(self, timeout: float) -> list:
        import ray
        from ray import exceptions

        events = self._drain()
        if not self.refs:
            time.sleep(timeout)
            return events + self._drain()
        ready, rest = ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        events += self._drain()
        for ref in ready:
            task = self.refs.pop(ref)
            try:
                result = ray.get(ref)
            except exceptions.TaskCancelledError:
                result = {"status": "interrupted", "attempt": task.attempt, "error": "Cancelled before it could save a checkpoint."}
            except exceptions.RayTaskError as exc:  # raised before or outside run_scene: bas missing on a node, a bug
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                hint = " (is bas installed on every node of the cluster?)" if isinstance(cause, ImportError) else ""
                result = {"status": "failed", "attempt": task.attempt, "error": f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}{hint}",
                          "traceback": str(exc)}
            except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.ObjectLostError, exceptions.OwnerDiedError,
                    exceptions.LocalRayletDiedError) as exc:
                result = crashed(task, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            except exceptions.RayError as exc:
                result = crashed(task, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            events.append(Finished(task.name, result))
        return events

    def _drain(self) -> list:
        import ray

        if self.inbox is None:
            return []
        try:
            return ray.get(self.inbox.drain.remote(), timeout=30)
        except Exception:  # the inbox went away with its node: the tasks' own results still come
            return []

    def interrupt(self) -> None:
        import ray

        for ref in list(self.refs):
            ray.cancel(ref)

    def close(self) -> None:
        try:
            import ray
        except ImportError:  # open() said how to install it
            return
        for ref in list(self.refs):
            ray.cancel(ref, force=True)
        self.refs.clear()
        if self.inbox is not None:
            try:
                ray.kill(self.inbox)
            except Exception:
                pass
            self.inbox = None
        if self.owned and ray.is_initialized():
            ray.shutdown()


@hookimpl
def bas_register_executors(register):
    register("ray", RayExecutor, description=f"a Ray task per scene on a Ray cluster or a local Ray ({INSTALL_HINT})")


@hookimpl
def bas_batch_options():
    return [
        click.Option(["--ray-address"], default=None, help="Ray cluster to join (executor ray): auto, HOST:PORT or ray://HOST:10001 [default: start Ray on this machine]."),
        click.Option(["--gpus-per-scene"], type=float, default=None, help="GPUs Ray gives each scene, fractions allowed (executor ray) [default: 1 on a cluster with GPUs, else 0]."),
        click.Option(["--cpus-per-scene"], type=float, default=1.0, show_default=True, help="CPU cores Ray gives each scene; its torch threads (executor ray)."),
    ]
