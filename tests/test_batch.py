"""`bas batch`: manifests, planning, the local executor with a killed worker, Ray, the summary and gallery."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import bas
from bas.core import checkpoint
from bas.core import plugins as plugins_module
from bas.batches import progress as progress_module
from bas.batches import runner as runner_module
from bas.batches.runner import Batch
from bas.core.batch.tasks import Finished, Progress, Started, crashed
from bas.core.errors import BasError
from bas.core.training import Interrupted

from conftest import run_main  # noqa: E402

FAST = ["--phase1-steps", "3", "--phase2-steps", "3"]




def summary(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "batch.json").read_text())["scenes"]}


def files_state(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def write_coco(root: Path) -> Path:
    """A COCO annotation file with one image of two large things (a person and a dog)."""
    image = Image.new("RGB", (128, 128), (90, 160, 90))
    pixels = np.asarray(image).copy()
    pixels[10:60, 10:60] = (200, 40, 40)
    pixels[70:120, 60:120] = (40, 40, 200)
    Image.fromarray(pixels).save(root / "000001.png")
    data = {
        "images": [{"id": 1, "width": 128, "height": 128, "file_name": "000001.png"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[8, 8, 62, 8, 62, 62, 8, 62]], "area": 2916, "iscrowd": 0, "bbox": [8, 8, 54, 54]},
            {"id": 11, "image_id": 1, "category_id": 18, "segmentation": [[58, 68, 122, 68, 122, 122, 58, 122]], "area": 3456, "iscrowd": 0, "bbox": [58, 68, 64, 54]},
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


# -- manifests and planning (nothing runs) ---------------------------------------------------------

def test_manifests_give_per_scene_options_with_paths_relative_to_the_manifest(scene, tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    shutil.copytree(scene, folder / "toys")
    (folder / "scenes.jsonl").write_text(
        "# a comment line\n"
        '{"name": "toys-long", "scene": "toys", "phase1-steps": 7, "init_token": ["ball", "box"], "plugins": ["tensorboard"]}\n'
        "\n"
        '{"image": "toys/img.png", "mask": ["toys/mask0.png", "toys/mask1.png"], "background": true}\n'
    )
    (folder / "more.csv").write_text("name,image,masks,init_tokens,phase2_steps,lora_rank\n"
                                     "csv-scene,toys/img.png,toys/mask0.png;toys/mask1.png,ball;box,5,\n")
    batch = Batch([folder / "scenes.jsonl", folder / "more.csv"], tmp_path / "runs", "local", [], False, 1, True,
                  {"phase1_steps": 2, "phase2_steps": 2, "lora_rank": 4})
    tasks = {s.spec.name: s.task for s in batch.states}
    assert list(tasks) == ["toys-long", "img", "csv-scene"]  # a line without a name is named after its image
    long, img, csv_scene = tasks.values()
    assert long.values["scene"] == folder / "toys" and long.values["phase1_steps"] == 7 and long.values["phase2_steps"] == 2
    assert long.values["init_tokens"] == ["ball", "box"] and long.plugins == ["tensorboard"]
    assert img.values["image"] == folder / "toys" / "img.png" and img.values["masks"] == (folder / "toys/mask0.png", folder / "toys/mask1.png")
    assert img.values["background"] is True and img.plugins == []
    # CSV text becomes typed values; an empty cell keeps the batch's value
    assert csv_scene.values["phase2_steps"] == 5 and csv_scene.values["lora_rank"] == 4 and csv_scene.values["init_tokens"] == ["ball", "box"]
    assert all(t.out == str(tmp_path.resolve() / "runs" / n) for n, t in tasks.items())
    assert not (tmp_path / "runs").exists()  # planning writes nothing


@pytest.mark.parametrize("manifest, message", [
    ('{"image": "a.png"}\n{"image": "b.png",}\n', r"scenes.jsonl line 2 is not valid JSON \(Expecting property name .*\); each line must be one JSON object"),
    ('["a.png"]\n', r"scenes.jsonl line 1 is a JSON list, not an object"),
    ('{"image": "a.png", "phase1_step": 3}\n', r'scenes.jsonl line 1: unknown option "phase1_step"; did you mean "phase1_steps"\?'),
    ('{"image": "a.png", "phase1_steps": "many"}\n', r'scenes.jsonl line 1: "phase1_steps" must be a whole number \(got \'many\'\)'),
    ('{"image": "a.png", "phase1_steps": -1}\n', r"scenes.jsonl line 1: --phase1-steps must be 0 or more, not -1"),
    ('{"image": "a.png", "out": "elsewhere"}\n', r'scenes.jsonl line 1: "out" is set by the batch, not per scene'),
    ('{"image": "a.png", "plugins": ["no-such-plugin"]}\n', r"scenes.jsonl line 1: Unknown plugin 'no-such-plugin'"),
    ('{"name": "up/../x", "image": "a.png"}\n', r"scenes.jsonl line 1: the scene name 'up/../x' contains '/'"),
    ('{"name": "..", "image": "a.png"}\n', r"scenes.jsonl line 1: the scene name '..' starts with '.'"),
    ('{"name": "index.html", "image": "a.png"}\n', r"the scene name 'index.html' is taken by the batch's own files"),
    ('{"phase1_steps": 3}\n', r'scenes.jsonl line 1: the line has no "name", "image" or "scene"'),
    ('{"name": "x", "image": "a.png"}\n{"name": "X", "image": "b.png"}\n',
     r"scenes.jsonl line 1 and .*scenes.jsonl line 2 are both named 'X' \(as 'x'\); every scene needs its own name"),
])
def test_bad_manifests_are_one_line_naming_the_line_and_nothing_is_written(manifest, message, tmp_path, capsys):
    (tmp_path / "scenes.jsonl").write_text(manifest)
    code, out, err = run_main(["batch", tmp_path / "scenes.jsonl", "--out", tmp_path / "runs"], capsys)
    assert code == 1 and err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("csv_text, message", [
    ("image,masks\na.png,m.png,extra\n", r"scenes.csv line 2 has 3 cells but the header names 2 columns"),
    ("a.png,m.png\n", r"scenes.csv line 1 must be a header naming the columns"),
    ("image,phase2_steps\na.png,4.5\n", r'scenes.csv line 2: "phase2_steps" must be a whole number \(got \'4.5\'\)'),
    ("image,lora_rank\na.png,eight\n", r'scenes.csv line 2: "lora_rank": \'eight\' is not a valid integer\.'),
])
def test_bad_csv_manifests_name_the_line(csv_text, message, tmp_path):
    (tmp_path / "scenes.csv").write_text(csv_text)
    with pytest.raises(BasError, match=message):
        bas.batch([tmp_path / "scenes.csv"], tmp_path / "runs")


def test_scene_folders_and_command_line_mistakes(scene, tmp_path, capsys):
    shutil.copytree(scene, tmp_path / "set" / "toys")
    shutil.copytree(scene, tmp_path / "other" / "toys")
    cases = [
        ([tmp_path / "set"], r"set holds scene folders \(toys\), not a scene; pass them one by one, such as .*set/\*"),
        ([tmp_path / "set" / "toys", tmp_path / "other" / "toys"], r"are both named 'toys'"),
        ([tmp_path / "nowhere"], r"nowhere does not exist; pass scene folders or manifests"),
        ([], r"No scenes were given"),
        ([tmp_path / "set" / "toys", "--executor", "slurm"], r"Unknown executor 'slurm' for --executor; choose one of: local, ray"),
        ([tmp_path / "set" / "toys", "--executor", "ray", "--workers", "2"], r"--workers belongs to the 'local' executor, but this batch runs on 'ray'"),
        ([tmp_path / "set" / "toys", "--workers", "0"], r"--workers must be 1 or more, not 0"),
        ([tmp_path / "set" / "toys", "--phase1-steps", "-2"], r"--phase1-steps must be 0 or more"),
    ]
    for args, message in cases:
        code, _, err = run_main(["batch", *args, "--out", tmp_path / "runs"], capsys)
        assert code == 1 and err.startswith("Error: ") and "Traceback" not in err, (args, err)
        assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_ray_missing_or_unreachable_is_one_line(scene, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(BasError, match=rf"Cannot reach the Ray cluster at 127.0.0.1:{port} \(.*\); check that `ray start --head` runs there"):
        bas.batch([scene], tmp_path / "runs", executor="ray", ray_address=f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 30  # Ray alone retries such an address for minutes
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(BasError, match=r"--executor ray needs Ray, which is not installed; install it with: pip install 'bas\[ray\]'"):
        bas.batch([scene], tmp_path / "runs", executor="ray")
    assert not (tmp_path / "runs").exists()


class Ref:
    """A fake Ray object reference: it holds its value."""

    def __init__(self, value):
        self.value = value


class FakeRemote:
    def __init__(self, ray, target, options=None):
        self.ray, self.target, self.given = ray, target, options or {}

    def options(self, **options):
        return FakeRemote(self.ray, self.target, options)

    def remote(self, *args):
        if isinstance(self.target, type):  # the inbox actor: no events
            return types.SimpleNamespace(drain=types.SimpleNamespace(remote=lambda: Ref([])), put=types.SimpleNamespace(remote=lambda e: None))
        task, _, cpu_only = args
        self.ray.tasks.append((task.name, self.given, cpu_only))
        return Ref({"status": "done", "attempt": task.attempt, "device": "cpu" if cpu_only else "cuda:0", "files": ["run.json"]})


class FakeRay(types.ModuleType):
    """Ray as the ray executor uses it, on a cluster with ``resources``: it records ray.init's
    arguments and each task's options, and its tasks finish at once without running."""

    def __init__(self, resources, fail=None):
        super().__init__("ray")
        self.resources, self.fail = resources, fail
        self.inits, self.tasks, self.connected = [], [], False
        self.exceptions = types.SimpleNamespace()

    def is_initialized(self):
        return self.connected

    def init(self, address=None, **options):
        self.inits.append((address, options))
        if self.fail:
            raise self.fail
        self.connected = True

    def shutdown(self):
        self.connected = False

    def cluster_resources(self):
        return dict(self.resources)

    def remote(self, target):
        return FakeRemote(self, target)

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref, timeout=None):
        return ref.value

    def cancel(self, ref, force=False):
        pass

    def kill(self, actor):
        pass


@pytest.fixture
def listening():
    """A port on this machine that accepts connections (where a cluster's head would listen)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("address, resources, extra, gpus", [
    ("ray://127.0.0.1:{port}", {"CPU": 64.0, "GPU": 8.0}, [], 1),  # a GPU cluster: one GPU per scene
    ("auto", {"CPU": 64.0}, [], 0),  # a CPU cluster: none
    ("127.0.0.1:{port}", {"CPU": 64.0, "GPU": 8.0}, ["--device", "cpu"], 0),  # the runs asked for the CPU
    ("ray://127.0.0.1:{port}", {"CPU": 64.0, "GPU": 8.0}, ["--gpus-per-scene", "0.5"], 0.5),
])
def test_ray_address_reaches_ray_init_unchanged_and_gpus_per_scene_follow_the_cluster(address, resources, extra, gpus, listening, scene,
                                                                                       tmp_path, monkeypatch, capsys):
    """A real cluster cannot run here: a fake Ray stands in for one, behind a port that listens."""
    address = address.format(port=listening)
    ray = FakeRay(resources)
    monkeypatch.setitem(sys.modules, "ray", ray)
    (tmp_path / "scenes.jsonl").write_text("".join(json.dumps({"name": n, "scene": str(scene)}) + "\n" for n in ("a", "b")))
    code, out, err = run_main(["batch", tmp_path / "scenes.jsonl", "--out", tmp_path / "runs", "--executor", "ray", "--ray-address", address,
                               *extra, "--quiet"], capsys)
    assert code == 0, err
    assert [a for a, _ in ray.inits] == [address]  # as given: Ray Client takes ray://, a driver on the cluster HOST:PORT or auto
    assert "include_dashboard" not in ray.inits[0][1]  # joining a cluster starts nothing of its own
    assert ray.tasks == [(n, {"name": f"bas batch: {n}", "num_gpus": gpus, "num_cpus": 1.0, "max_retries": 0}, not gpus) for n in ("a", "b")]
    scenes = summary(tmp_path / "runs")
    assert [scenes[n]["status"] for n in ("a", "b")] == ["done", "done"] and scenes["a"]["device"] == ("cuda:0" if gpus else "cpu")
    assert json.loads((tmp_path / "runs" / "batch.json").read_text())["executor_options"]["ray_address"] == address
    assert not ray.connected  # the batch leaves the cluster it joined


def test_bad_ray_addresses_are_one_line_each_and_nothing_is_written(listening, scene, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    # what Ray raises: a Ray Client that got no answer, no cluster for auto, another Ray version on the cluster
    no_answer = ConnectionError("ray client connection timeout")
    no_cluster = ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by setting `--address` flag "
                                 "or `RAY_ADDRESS` environment variable.")
    mismatch = RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.41.0\n    Python: 3.11.9\n"
                            "This process on node 10.0.0.5 was started with:\n    Ray: 2.60.0\n    Python: 3.12.3\n")
    cases = [
        ("ray://", None, r"--ray-address ray:// is not an address; pass auto, HOST:PORT \(a cluster's head, port 6379\) or ray://HOST:10001\."),
        ("ray://head:port", None, r"--ray-address ray://head:port is not an address; pass auto"),
        ("http://127.0.0.1:8265", None, r"--ray-address http://127.0.0.1:8265 is not a Ray address; pass auto, HOST:PORT .* or ray://HOST:10001"),
        (f"ray://127.0.0.1:{closed}", None, rf"Cannot reach the Ray cluster at ray://127.0.0.1:{closed} \(Connection refused\); check that "
                                            r"`ray start --head` runs there and that the port is open from this machine\."),
        (f"ray://127.0.0.1:{listening}", no_answer, rf"Cannot reach a Ray cluster at ray://127.0.0.1:{listening} \(ray client connection timeout\); "
                                                    r"start one with `ray start --head`, or leave out --ray-address"),
        ("auto", no_cluster, r"Cannot reach a Ray cluster at auto \(Could not find any running Ray instance\); start one with `ray start --head`"),
        (f"ray://127.0.0.1:{listening}", mismatch, rf"Cannot join the Ray cluster at ray://127.0.0.1:{listening} \(Version mismatch: The cluster was "
                                                   r"started with: Ray: 2.41.0 Python: 3.11.9 This process .* Ray: 2.60.0 Python: 3.12.3\); install the "
                                                   r"cluster's Ray and Python versions here, or leave out --ray-address"),
    ]
    for address, failure, message in cases:
        ray = FakeRay({"CPU": 8.0}, fail=failure)
        monkeypatch.setitem(sys.modules, "ray", ray)
        code, _, err = run_main(["batch", scene, "--out", tmp_path / "runs", "--executor", "ray", "--ray-address", address], capsys)
        assert code == 1 and err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err, (address, err)
        assert re.fullmatch(f"Error: {message}.*\n", err), err
        assert len(ray.inits) == (failure is not None) and not ray.connected, address  # checked before Ray is asked, where that can be
    assert not (tmp_path / "runs").exists()


def test_coco_select_writes_a_manifest_that_bas_batch_takes(tmp_path, capsys):
    annotations = write_coco(tmp_path)
    code, out, err = run_main(["coco-select", "--annotations", annotations, "--format", "jsonl", "--images", tmp_path], capsys)
    assert code == 0, err
    line = json.loads(out.strip())
    assert line == {"name": "coco-1", "image": str(tmp_path / "000001.png"), "plugins": ["coco-masks"], "annotations": str(annotations),
                    "image_id": 1, "min_area": 0.15, "init_tokens": ["dog", "person"]}  # largest first, as coco-masks orders them
    code, _, err = run_main(["coco-select", "--annotations", annotations, "--format", "jsonl"], capsys)
    assert code == 1 and "pass the folder of the COCO images with --images DIR" in err


# -- the runner's decisions, with an executor that runs nothing --------------------------------------

class ScriptedExecutor:
    """An executor whose tasks 'run' by script, without training: the first attempt of 'dies'
    crashes, 'slow' runs until Ctrl-C, 'queued' never starts, the rest finish at once."""

    submitted: list = []

    def __init__(self, config):
        self.pending, self.running, self.events = [], [], []

    def open(self, num_tasks):
        pass

    def submit(self, task):
        ScriptedExecutor.submitted.append((task.name, task.attempt, task.overwrite))
        self.pending.append(task)

    def poll(self, timeout):
        self.polls = getattr(self, "polls", 0) + 1
        assert self.polls < 50, "the batch waits for a scene that can no longer finish"
        if self.events:
            events, self.events = self.events, []
            return events
        events = []
        for task in list(self.pending):
            if task.name == "queued":
                continue
            if task.name == "slow":
                if task in self.running:
                    raise KeyboardInterrupt
                self.running.append(task)
                events.append(Started(task.name, task.attempt, "host", 1))
                continue
            self.pending.remove(task)
            result = crashed(task, "killed by SIGKILL") if task.name == "dies" and task.attempt == 1 else \
                {"status": "done", "attempt": task.attempt, "device": "cpu", "files": ["run.json"], "started": time.time(), "finished": time.time()}
            events += [Started(task.name, task.attempt, "host", 1), Finished(task.name, result)]
        return events

    def interrupt(self):
        self.pending = []
        self.events = [Finished(t.name, {"status": "interrupted", "error": "Interrupted at phase 1 step 2; ..."}) for t in self.running]

    def close(self):
        pass


class PacedExecutor:
    """An executor that runs nothing and sets the progress clock: every poll is ten seconds later;
    the first starts every scene (each at phase 1, step 2 of 4), each later one finishes one scene
    in the order submitted ('bad' fails)."""

    now = 0.0

    def __init__(self, config):
        self.pending, self.begun = [], False

    def open(self, num_tasks):
        pass

    def submit(self, task):
        self.pending.append(task)

    def poll(self, timeout):
        PacedExecutor.now += 10
        if not self.begun:
            self.begun = True
            return [Started(t.name, t.attempt, "host", 1) for t in self.pending] + [Progress(t.name, 1, 2, 4, "cpu") for t in self.pending]
        task = self.pending.pop(0)
        if task.name == "bad":
            return [Finished(task.name, {"status": "failed", "attempt": 1, "error": "mask1.png is empty after cropping to a square."})]
        return [Finished(task.name, {"status": "done", "attempt": 1, "device": "cpu", "files": ["run.json"], "seconds": 10.0})]

    def interrupt(self):
        pass

    def close(self):
        pass


class Scripted:
    def __init__(self):
        self.executor = ScriptedExecutor

    @bas.hookimpl
    def bas_register_executors(self, register):
        register("scripted", ScriptedExecutor)
        register("paced", PacedExecutor)


@pytest.fixture
def scripted(monkeypatch):
    class EntryPoint:
        name, value, dist = "scripted", "tests", None

        def load(self):
            return Scripted()

    monkeypatch.setattr(plugins_module, "_entry_points", lambda: {"scripted": EntryPoint()})
    ScriptedExecutor.submitted = []
    return ScriptedExecutor


def fake_finished_run(folder: Path, config: dict) -> None:
    """A finished run as far as the batch checks one (bas.core.runs.read_run): a run.json and the handles it lists."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"<asset0>": torch.zeros(4)}, str(folder / "handles.safetensors"))
    (folder / "run.json").write_text(json.dumps({"config": config, "device": "cpu", "model": "tiny", "handles": ["<asset0>"], "resolution": 64,
                                                 "files": ["handles.safetensors"], "times": {"total_s": 1.5}}, default=str))


def test_runner_skips_same_options_reports_other_options_and_retries_a_dead_process(scene, scripted, tmp_path):
    out = tmp_path / "runs"
    lines = [{"name": n, "scene": str(scene)} for n in ("same", "other", "dies", "fresh")]
    options = {"plugins": ["scripted"], "phase1_steps": 2, "phase2_steps": 2, "quiet": True}
    planned = Batch(lines, out, "scripted", ["scripted"], False, 1, True, {"phase1_steps": 2, "phase2_steps": 2})
    wanted = {s.spec.name: s for s in planned.states}
    from bas.core.api import make_config

    config = make_config(planned.managers[("scripted",)], dict(wanted["same"].task.values, out=out / "same"), ["scripted"]).to_json()
    fake_finished_run(out / "same", config)
    fake_finished_run(out / "other", dict(config, seed=7))
    before = files_state(out)

    result = bas.batch(lines, out, executor="scripted", **options)
    scenes = {s["name"]: s for s in result["scenes"]}
    assert [(n, scenes[n]["status"]) for n in scenes] == [("same", "skipped"), ("other", "other-options"), ("dies", "done"), ("fresh", "done")]
    assert "holds a finished run made with other options (seed: 7 there, 0 requested); pass --overwrite" in scenes["other"]["error"]
    assert scenes["same"]["seconds"] == 1.5 and scenes["dies"]["attempt"] == 2
    assert scripted.submitted == [("dies", 1, False), ("fresh", 1, False), ("dies", 2, False)]
    assert {k: v for k, v in files_state(out).items() if not k.startswith((".batch", "batch.json", "index"))} == before
    assert result["counts"] == {"done": 2, "skipped": 1, "other-options": 1}

    scripted.submitted = []
    fake_finished_run(out / "dies", dict(config, seed=7))  # a run to replace: its retry replaces it too, not "pass --overwrite"
    result = bas.batch(lines, out, executor="scripted", overwrite=True, **options)
    assert scripted.submitted == [("other", 1, True), ("dies", 1, True), ("fresh", 1, False), ("dies", 2, True)]


@pytest.mark.parametrize(
    "attempt, overwrite, finished, saved, resume",
    [
        (1, False, False, True, True),  # an interrupted run: continued
        (1, True, True, True, False),  # told to replace a run: starts over, whatever an earlier replacement left
        (1, False, False, False, False),
        (2, True, True, True, True),  # its first attempt died while replacing a run: what it saved is continued
        (2, True, True, False, False),  # it died before a checkpoint: it starts over again, still replacing
        (2, False, False, True, True),
    ],
)
def test_a_scenes_worker_resumes_what_an_earlier_attempt_saved_and_replaces_what_it_was_told_to(
    attempt, overwrite, finished, saved, resume, tmp_path, monkeypatch
):
    from bas.core.batch import tasks

    out = tmp_path / "runs" / "s"
    if finished:
        fake_finished_run(out, {})
    given = {}

    def extract(config, plugins):
        given.update(resume=config.resume, overwrite=config.overwrite)
        raise BasError("stop here")

    monkeypatch.setattr("bas.core.training.extract", extract)
    monkeypatch.setattr(tasks.checkpoint, "complete_checkpoints", lambda folder: ["phase1-step00002"] if saved else [])
    task = tasks.SceneTask("s", str(out), {"model": "m", "scene": str(tmp_path)}, [], overwrite=overwrite, attempt=attempt)
    result = tasks.run_scene(task, lambda event: None)
    assert result["error"] == "stop here" and given == {"resume": resume, "overwrite": overwrite} and result["resumed"] is resume


def test_a_batch_says_once_which_recommended_settings_its_scenes_take(scene, scripted, tmp_path, capsys):
    lines = [{"name": "a", "scene": str(scene), "model": "bas-mini"}, {"name": "b", "scene": str(scene), "model": "bas-mini"},
             {"name": "given", "scene": str(scene), "model": "bas-mini", "phase1_lr": 1e-3}, {"name": "paper", "scene": str(scene)}]
    bas.batch(lines, tmp_path / "runs", executor="scripted", plugins=["scripted"], phase1_steps=2, phase2_steps=2)
    said = [line for line in capsys.readouterr().err.splitlines() if "recommended settings" in line]
    assert said == [
        "2 of 4 scene(s): Using bas-mini's recommended settings for the options you left out: --phase1-lr 0.002 --attention-loss-weight 0.1 "
        "(give an option to choose its value, or --no-model-defaults for bas's own defaults).",
        "1 of 4 scene(s): Using bas-mini's recommended settings for the options you left out: --attention-loss-weight 0.1 "
        "(give an option to choose its value, or --no-model-defaults for bas's own defaults).",
    ]
    bas.batch(lines, tmp_path / "quiet", executor="scripted", plugins=["scripted"], phase1_steps=2, phase2_steps=2, quiet=True)
    assert "recommended" not in capsys.readouterr().err


def test_ctrl_c_stops_running_scenes_with_a_checkpoint_and_says_how_to_continue(scene, scripted, tmp_path):
    # 'dies' crashes and is queued again; Ctrl-C comes before its retry starts
    lines = [{"name": "slow", "scene": str(scene)}, {"name": "queued", "scene": str(scene)}, {"name": "dies", "scene": str(scene)}]
    with pytest.raises(Interrupted, match=r"Interrupted; 1 running scene\(s\) stopped .* \(slow\); run the same command again to continue"):
        bas.batch(lines, tmp_path / "runs", executor="scripted", plugins=["scripted"], quiet=True)
    scenes = summary(tmp_path / "runs")
    assert scenes["slow"]["status"] == "interrupted" and scenes["queued"]["status"] == "not-started"
    assert scenes["dies"]["status"] == "not-started" and "died (killed by SIGKILL)" in scenes["dies"]["error"]
    assert json.loads((tmp_path / "runs" / "batch.json").read_text())["interrupted"] is True


# -- what a person sees while a batch runs --------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def paced(scene, scripted, tmp_path, monkeypatch):
    """``bas batch`` arguments for three scenes (a, bad, c) on the paced executor, whose polls set the clock."""
    PacedExecutor.now = 0.0
    monkeypatch.setattr(progress_module, "clock", lambda: PacedExecutor.now)
    (tmp_path / "scenes.jsonl").write_text("".join(json.dumps({"name": n, "scene": str(scene)}) + "\n" for n in ("a", "bad", "c")))
    return ["batch", tmp_path / "scenes.jsonl", "--out", tmp_path / "runs", "--plugin", "scripted", "--executor", "paced"]


def test_progress_off_a_terminal_shows_each_scene_and_the_counts_with_an_eta(paced, capsys):
    code, out, err = run_main(paced, capsys)
    assert code == 1 and "bad (failed): mask1.png is empty" in out
    assert err.splitlines() == [
        "Running 3 scene(s).",
        "a: started", "bad: started", "c: started",
        "a: phase 1, 4 steps, from step 2", "bad: phase 1, 4 steps, from step 2", "c: phase 1, 4 steps, from step 2",
        "a: done in 10.0 s",
        "scenes 1/3: 1 done, 2 running, 0 failed; 00:20 elapsed, ETA 00:40",  # one scene per 20 s so far, two to go
        "bad: failed: mask1.png is empty after cropping to a square.",
        "scenes 2/3: 1 done, 1 running, 1 failed; 00:30 elapsed, ETA 00:15",
        "c: done in 10.0 s",
        "scenes 3/3: 2 done, 0 running, 1 failed; 00:40 elapsed",
    ]


def test_progress_on_a_terminal_is_one_bar_over_the_scenes_and_quiet_silences_it(paced, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code, out, _ = run_main(paced, capsys)
    assert code == 1 and "bad (failed)" in out
    shown = terminal.getvalue()
    frames = [f.strip() for f in re.split(r"[\r\n]|\x1b\[A", shown) if f.strip()]
    bars = [f for f in frames if f.startswith("scenes:")]
    # the main bar: finished/total, elapsed<ETA, and the counts; redrawn as scenes start and end
    assert re.search(r"\b0/3 \[[\d:]+<\?, .*0 done, 3 running, 0 failed\]", shown), bars
    assert re.search(r"\b1/3 \[[\d:]+<[\d:]+, .*1 done, 2 running, 0 failed\]", shown), bars
    assert re.search(r"\b2/3 \[[\d:]+<[\d:]+, .*1 done, 1 running, 1 failed\]", shown), bars
    assert re.search(r"\b3/3 \[[\d:]+<00:00, .*2 done, 0 running, 1 failed\]", shown), bars
    # a bar per running scene with its phase and step, and a line per finished scene above the bars
    assert re.search(r"a: phase 1: +50%\|.*\| 2/4", shown) and "bad: failed: mask1.png is empty after cropping to a square." in frames
    assert not any(f.startswith("scenes ") for f in frames)  # the one-line tally is for logs only

    terminal.seek(0), terminal.truncate()
    shutil.rmtree(paced[3])
    code, out, err = run_main([*paced, "--quiet"], capsys)
    assert code == 1 and "bad (failed)" in out  # the outcome still comes, on stdout
    assert terminal.getvalue() == "" and err == ""


def test_a_retried_scene_keeps_one_bar_on_a_terminal():
    progress = progress_module.BatchProgress(2, stream=Terminal())
    progress.started("a")
    progress.started("a", attempt=2)  # its process died and it runs again
    progress.started("b")
    assert sorted(progress.slots.items()) == [("a", 1), ("b", 2)] and progress.counts() == "0 done, 2 running, 0 failed"
    progress.finished("a", "done")
    progress.finished("b", "failed", "boom")
    assert progress.slots == {} and progress.free_slots == list(range(1, progress_module.MAX_SCENE_BARS + 1))
    progress.close()
    assert "2/2" in progress.stream.getvalue() and "1 done, 0 running, 1 failed" in progress.stream.getvalue()


# -- real runs: local worker processes and Ray --------------------------------------------------------

def wait_until(ready, proc: subprocess.Popen, timeout=300.0) -> None:
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def status_of(out: Path, name: str) -> str | None:
    try:
        return summary(out)[name]["status"]
    except (OSError, ValueError, KeyError):
        return None


def gallery_pictures(out: Path) -> list[str]:
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # renders with no network
    sources = re.findall(r'<img src="([^"]+)"', page)
    for src in sources:
        assert (out / src).is_file(), src
    return sources


def test_local_workers_kill_one_scene_then_skip_resume_and_retry(scene, tiny_model, tmp_path, capsys):
    """Three scenes on two workers: one from a manifest with its own options (killed with SIGKILL
    mid-run), one from `bas coco-select`, one bad.  The second invocation resumes the killed one,
    leaves the finished one untouched and fails the bad one again."""
    out = tmp_path / "runs"
    (tmp_path / "scenes.jsonl").write_text(json.dumps({"name": "slow", "scene": str(scene), "phase1_steps": 20, "phase2_steps": 20,
                                                        "checkpoint_every": 2, "init_tokens": ["ball", "box"]}) + "\n")
    annotations = write_coco(tmp_path)
    code, coco_lines, _ = run_main(["coco-select", "--annotations", annotations, "--format", "jsonl", "--images", tmp_path], capsys)
    (tmp_path / "coco.jsonl").write_text(coco_lines)
    bad = tmp_path / "bad"
    shutil.copytree(scene, bad)
    Image.new("L", (128, 128), 0).save(bad / "mask1.png")  # an empty mask: the scene fails in its worker
    # 'slow' goes to one worker; 'bad' to the other, which then runs 'coco-1' after that failure
    args = ["batch", tmp_path / "scenes.jsonl", bad, tmp_path / "coco.jsonl", "--out", out, "--model", tiny_model, *FAST, "--workers", "2"]

    proc = subprocess.Popen([sys.executable, "-m", "bas.cli", *map(str, args), "--retries", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # kill 'slow' once it has a checkpoint and 'bad' has failed, so that 'coco-1' runs in bad's worker
    wait_until(lambda: status_of(out, "bad") == "failed" and checkpoint.complete_checkpoints(out / "slow"), proc)
    killed = summary(out)["slow"]["pid"]
    (tmp_path / "killed-at").write_text(checkpoint.complete_checkpoints(out / "slow")[-1].name)
    os.kill(killed, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    scenes = summary(out)
    assert scenes["slow"]["status"] == "failed" and "died (killed by SIGKILL)" in scenes["slow"]["error"]
    assert "running the batch again resumes it" in scenes["slow"]["error"]
    assert scenes["coco-1"]["status"] == "done" and scenes["bad"]["status"] == "failed"
    assert "mask1.png is empty after cropping to a square" in scenes["bad"]["error"]
    assert f"bad (failed): {scenes['bad']['error']}" in stdout and "Traceback" not in stderr
    assert "coco-1: phase 2, 3 steps" in stderr  # each scene's phase, forwarded from its worker
    coco_run = json.loads((out / "coco-1" / "run.json").read_text())
    assert coco_run["config"]["plugins"] == ["coco-masks"] and coco_run["config"]["options"]["image_id"] == 1
    assert coco_run["config"]["phase1_steps"] == 3 and len(coco_run["handles"]) == 2  # the dog and the person
    assert coco_run["init_tokens"] == ["dog", "person"] and coco_run["masks"][0].startswith("COCO annotation 11 (dog,")
    assert scenes["coco-1"]["pid"] == scenes["bad"]["pid"]  # a worker runs scene after scene
    # what bas run writes for that scene, weight for weight
    line = json.loads(coco_lines)
    alone = bas.extract(line.pop("image"), [], tmp_path / "alone", plugins=line.pop("plugins"), **{k: v for k, v in line.items() if k != "name"},
                        model=str(tiny_model), phase1_steps=3, phase2_steps=3, quiet=True)
    for name in ("handles.safetensors", "lora/pytorch_lora_weights.safetensors"):
        batch_tensors, alone_tensors = load_file(str(out / "coco-1" / name)), load_file(str(alone.out / name))
        assert batch_tensors.keys() == alone_tensors.keys() and all(torch.equal(batch_tensors[k], alone_tensors[k]) for k in batch_tensors), name
    assert not (out / "slow" / "run.json").exists() and checkpoint.complete_checkpoints(out / "slow")
    finished_files = files_state(out / "coco-1")

    code, stdout, _ = run_main(args[:-1] + ["1"], capsys)  # --workers 1: an executor option, not one of the runs'
    assert code == 1
    scenes = summary(out)
    assert scenes["coco-1"]["status"] == "skipped" and files_state(out / "coco-1") == finished_files  # not rewritten
    assert scenes["bad"]["status"] == "failed" and "bad (failed)" in stdout and "slow" not in stdout
    slow = scenes["slow"]
    assert slow["status"] == "done" and slow["resumed"] is True and slow["attempt"] == 1
    phase, step = re.fullmatch(r"phase(\d)-step(\d+)", (tmp_path / "killed-at").read_text()).groups()
    assert (slow["resumed_at"]["phase"], slow["resumed_at"]["step"]) >= (int(phase), int(step))  # only the steps since it were lost
    slow_run = json.loads((out / "slow" / "run.json").read_text())
    assert slow_run["resumed"] is True and slow_run["config"]["phase1_steps"] == 20 and slow_run["config"]["init_tokens"] == ["ball", "box"]
    assert not checkpoint.complete_checkpoints(out / "slow")

    pictures = gallery_pictures(out)
    for name in ("slow", "coco-1"):
        assert f".batch/previews/{name}.png" in pictures and f"{name}/report/attention-phase2.png" in pictures
    page = (out / "index.html").read_text()
    assert "is empty after cropping to a square" in page and 'href="#bad"' in page  # the bad scene is listed first, with its error


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bas[ray]'); the ray executor cannot be tested")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_runs_each_scene_as_a_ray_task_with_progress(local_ray, scene, tiny_model, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(runner_module.BatchProgress, "update", lambda self, name, phase, step, total: seen.append((name, phase, step, total)))
    no_masks = tmp_path / "no-masks"
    no_masks.mkdir()
    shutil.copy(scene / "img.png", no_masks / "img.png")
    lines = [{"name": "toys", "scene": str(scene), "phase2_steps": 2}, {"name": "no-masks", "image": str(no_masks / "img.png")}]
    # two CPUs per scene on a Ray of two: one scene at a time
    result = bas.batch(lines, tmp_path / "runs", executor="ray", cpus_per_scene=2, model=str(tiny_model), phase1_steps=3, phase2_steps=3, quiet=True)
    records = {s["name"]: s for s in result["scenes"]}
    assert records["toys"]["status"] == "done", records
    assert records["toys"]["device"] == "cpu" and records["toys"]["host"] == socket.gethostname()
    assert records["no-masks"]["status"] == "failed" and records["no-masks"]["error"] == "No masks; pass one --mask PNG per concept (or --scene DIR)."
    assert result["executor"] == "ray" and result["executor_options"]["cpus_per_scene"] == 2
    assert json.loads((tmp_path / "runs" / "toys" / "run.json").read_text())["config"]["phase2_steps"] == 2
    # phase and step came from the Ray tasks through the inbox actor, up to each phase's end
    assert ("toys", 1, 3, 3) in seen and ("toys", 2, 2, 2) in seen and ("no-masks", 0, 0, 0) in seen
    order = [n for n, *_ in seen]
    assert order == sorted(order, key=order.index)  # one scene after the other: sending progress lends Ray no CPU
    assert local_ray.is_initialized()  # the caller's Ray is left running


class RecordingProcess:
    """Stands in for a spawned worker: records the environment it would start with."""

    started: list = []

    def __init__(self, target, args, name, daemon):
        self.name = name

    def start(self):
        RecordingProcess.started.append((self.name, {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}))


@pytest.mark.parametrize("visible, device, workers, expected", [
    ("3,5", "auto", None, [("0", "3"), ("1", "5")]),  # one worker per GPU, each sees only its own
    ("3,5", "auto", 3, [("0", "3"), ("1", "5"), ("2", "3")]),  # more workers than GPUs: in turn
    ("3,5", "cpu", 2, [("0", ""), ("1", "")]),  # --device cpu: no GPU for anyone
    ("3,5", "cuda:1", 2, [("0", "3,5"), ("1", "3,5")]),  # one named GPU: every worker sees them all and uses it
    ("", "auto", None, [("0", "")]),  # no GPU: one worker
])
def test_local_workers_are_pinned_one_per_gpu_and_split_the_cpu_threads(visible, device, workers, expected, monkeypatch, tmp_path):
    from bas.core.batch.tasks import BatchConfig, SceneTask
    from bas.plugins import local_executor

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    executor = local_executor.LocalExecutor(BatchConfig(out=tmp_path, device=device, options={"workers": workers}))
    monkeypatch.setattr(executor.context, "Process", RecordingProcess)
    RecordingProcess.started = []
    executor.open(num_tasks=5)
    for i in range(len(expected)):
        executor.submit(SceneTask(name=f"s{i}", out=str(tmp_path / f"s{i}"), values={}, plugins=[]))
    threads = str(8 // len(expected))
    assert RecordingProcess.started == [(f"bas-batch-worker-{i}", {"CUDA_VISIBLE_DEVICES": gpu, "OMP_NUM_THREADS": threads}) for i, gpu in expected]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == visible  # the batch's own environment is as it was
    assert all(w.task.threads == int(threads) for w in executor.pool)


@pytest.mark.parametrize("name", ["index.html", "batch.json"])
def test_batch_never_replaces_a_users_file_of_its_own_names(name, scene, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / name).write_text("<html>mine</html>" if name == "index.html" else '{"mine": true}')
    code, _, err = run_main(["batch", scene, "--out", runs, *FAST], capsys)
    assert code == 1 and err.count("Error: ") == 1 and f"holds {name}, which is not an earlier bas batch's" in err, err
    assert sorted(p.name for p in runs.iterdir()) == [name] and "mine" in (runs / name).read_text()
