"""bas ui: the workspace boundary, the command lines the page runs, the extraction queue, and the whole
page in a real headless Chromium (Playwright) against `bas ui` on the tiny model and a tiny random SAM.

The browser test skips, with the reason, only when gradio, Playwright or Chromium cannot be had
(`.ci/run` installs Chromium with apt-get).  It writes a screenshot of each tab into a temporary
folder; BAS_UI_SCREENSHOTS=DIR copies them there too (how docs/ui-*.png were made).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load as load_safetensors

from bas.cli import cli
from bas.core import runfolder
from bas.core.checkpoint import complete_checkpoints
from bas.core.errors import BasError
from bas.exports.export import FORMATS
from bas.core.mask_cleanup import MaskCleanup
from bas.core.runfolder import staging_path
from bas.ui import commands, scenes
from bas.ui.jobs import Jobs
from bas.ui.workspace import Workspace, check_name

from conftest import save_tiny_sam  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]




# -- the workspace boundary ---------------------------------------------------------------------------
def test_paths_from_the_page_stay_inside_the_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    outside = tmp_path / "outside"
    outside.mkdir()
    (ws.root / "scenes" / "link").symlink_to(outside)
    assert ws.inside("scenes/x/../y") == ws.root / "scenes" / "y"
    assert ws.inside(ws.root / "runs") == ws.root / "runs"
    for path in ("..", "../outside", str(outside), "scenes/link", "scenes/link/img.png", "runs/../../outside"):
        with pytest.raises(BasError, match=r"is outside the workspace .*; bas ui only reads and writes inside it"):
            ws.inside(path)
    for name in ("../x", ".hidden", "a/b", "", "x" * 80):
        with pytest.raises(BasError, match="is not a usable run name"):
            check_name(name, "run")
    assert check_name(" toys-1.v2 ", "run") == "toys-1.v2"


def test_a_path_option_typed_on_the_page_is_refused_outside_the_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    for extra in (["--out", str(tmp_path / "elsewhere")], ["--plugin", "tensorboard", "--logging-dir", "../logs"], ["--mask", "/etc/hostname"]):
        with pytest.raises(BasError, match="is outside the workspace"):
            commands.parse_run(["--scene", "scenes/a", "--out", "runs/a", *extra], ws)
    config, names = commands.parse_run(["--scene", "scenes/a", "--out", "runs/a", "-p", "tensorboard", "--logging-dir", "logs/a"], ws)
    assert config.out == ws.root / "runs" / "a" and config.options["scene"] == ws.root / "scenes" / "a"
    assert config.options["logging_dir"] == ws.root / "logs" / "a" and names == ["tensorboard"]
    with pytest.raises(BasError, match="No such option '--no-such-option'"):
        commands.parse_run(["--out", "runs/a", "--no-such-option"], ws)


# -- the Scene tab's init words -------------------------------------------------------------------------
def test_an_init_word_goes_to_the_concept_it_was_typed_for(scene):
    """The page sends the word with the concept shown beside it: a word whose last keystroke arrives
    after another concept was picked still goes to the one it was typed for."""
    draft = scenes.new_draft(scene / "img.png")
    assert not scenes.set_init_word(draft, None, "bear") and not scenes.set_init_word(None, "<asset0>", "bear")  # no concept yet
    draft.concepts += [scenes.Concept(), scenes.Concept(), scenes.Concept()]
    draft.selected = 2
    assert scenes.set_init_word(draft, "<asset0>", " bear ")  # typed for <asset0>, <asset2> picked since
    assert scenes.set_init_word(draft, None, "box")  # no concept named: the selected one
    assert [c.init_word for c in draft.concepts] == ["bear", "", "box"]
    assert scenes.init_words(draft) == ["bear", "object", "box"]  # a blank word is the default one
    scenes.set_init_word(draft, "<asset1>", "teddy bear")
    with pytest.raises(BasError, match="The init word 'teddy bear' is not one word"):
        scenes.init_words(draft)


def test_the_scene_tab_says_whether_sam_is_ready_and_how_to_make_it_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ready, line = scenes.sam_status("nobody/no-such-sam")
    assert not ready and "not downloaded and this machine is offline: paint masks with the brush or upload them" in line
    (tmp_path / "empty").mkdir()
    ready, line = scenes.sam_status(str(tmp_path / "empty"))
    assert not ready and "is not a SAM checkpoint folder" in line
    ready, line = scenes.sam_status(str(save_tiny_sam(tmp_path / "sam")))
    assert ready and line.startswith("SAM: ready")


# -- the command lines the page shows are the ones it runs ---------------------------------------------
def test_the_shown_command_line_makes_the_same_run_config_as_the_page(tmp_path):
    ws = Workspace(tmp_path / "ws")
    form = {"scene": "scenes/toys", "out": "runs/toys", "model": "some/model", "weights": "lora", "phase1_steps": 100, "phase2_steps": 400.0,
            "phase1_lr": 5e-4, "phase2_lr": 2e-4, "lora_rank": 4, "seed": 3.0, "resolution": None, "precision": "auto", "device": "cpu",
            "init_tokens": ["bear", "ball"], "background": True, "plugins": ["tensorboard"], "extra": "--validation-prompt 'a photo of <asset0>'",
            "overwrite": True}
    ran, _ = commands.parse_run(commands.run_args(form, commands.absolute(ws)), ws)
    shown = commands.run_args(form, commands.relative)
    assert shown[:4] == ["--scene", "scenes/toys", "--out", "runs/toys"]
    assert "--phase2-steps" not in shown and "--precision" not in shown  # defaults are left out
    # what a user types after `cd WORKSPACE`: the real `bas run` parser, from the workspace
    typed, _ = commands.parse_run(shlex.split(commands.shell(shown)), ws)
    assert typed.to_json() == ran.to_json()
    assert ran.phase1_steps == 100 and ran.phase2_lr == 2e-4 and ran.options["lora_rank"] == 4 and ran.init_tokens == ["bear", "ball"]
    assert ran.options["validation_prompts"] == ("a photo of <asset0>",) and ran.plugins == ["tensorboard"] and ran.background

    # a run started on the command line resumes from the page with the options its checkpoint saved
    again, _ = commands.parse_run(commands.config_args(json.loads(json.dumps(ran.to_json(), default=str))) + ["--resume"], ws)
    as_saved = lambda config: json.loads(json.dumps(config.to_json(), default=str))  # noqa: E731  (as run.json and checkpoints keep it)
    assert {**as_saved(again), "resume": False, "overwrite": True} == as_saved(ran)


# -- the queue: one extraction at a time per device, Stop = Ctrl-C, Resume = --resume -------------------
def test_the_queue_runs_one_extraction_per_device_and_stop_saves_a_resumable_checkpoint(tmp_path, tiny_model, scene):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(scene, ws.root / "scenes" / "s")
    jobs = Jobs(ws.jobs, lambda args: commands.parse_run(args, ws))
    base = ["--scene", "scenes/s", "--model", str(tiny_model), "--device", "cpu", "--plugin", "no:report", "--checkpoint-every", "0"]
    first = jobs.submit([*base, "--out", "runs/a", "--phase1-steps", "40", "--phase2-steps", "2"], "a")
    second = jobs.submit([*base, "--out", "runs/b", "--phase1-steps", "2", "--phase2-steps", "0"], "b")
    with pytest.raises(BasError, match=r"a is already (queued|running); wait for it, stop it \(its Stop button in the queue\), or choose another run name"):
        jobs.submit([*base, "--out", "runs/a"], "a again")
    deadline = time.time() + 60
    while len(first.history) < 3 and time.time() < deadline:
        time.sleep(0.02)
    assert first.state == "running" and second.state == "queued" and jobs.place(second) == 1
    assert "queued on cpu (1 ahead of it)" in second.status(jobs.place(second))
    assert re.match(r"a: phase 1 of 2, step \d+/40, .*, ETA .*, loss \d", first.status()), first.status()
    jobs.stop(first)
    while (first.state != "interrupted" or second.state != "finished") and time.time() < deadline + 60:
        time.sleep(0.05)
    assert first.state == "interrupted" and "Resume continues it" in first.message, first.message
    assert second.state == "finished" and (ws.root / "runs" / "b" / "run.json").is_file()
    assert ws.run_entry(ws.root / "runs" / "a").status == "interrupted" and not (ws.root / "runs" / "a" / "run.json").exists()
    # the interrupted run lives in its staging folder beside runs/a: the list shows it by its own name
    assert [p.name for p in ws.run_folders()] == ["a", "b"] and ws.finished_runs() == ["runs/b"]
    stopped_at = len(first.history)

    again = jobs.submit(first.args + ["--resume"], "a --resume")
    while again.state in ("queued", "running") and time.time() < deadline + 120:
        time.sleep(0.05)
    assert again.state == "finished", again.message
    info = json.loads((ws.root / "runs" / "a" / "run.json").read_text())
    assert info["resumed"] and len(info["history"]["phase1"]) == 40 and len(info["history"]["phase2"]) == 2
    assert second.attention.is_file() and again.attention.is_file()  # each handle's map at the end of each phase
    assert again.history[stopped_at - 1]["step"] == stopped_at  # it went on from the checkpoint, not from step 1
    assert json.loads((ws.jobs / first.id / "job.json").read_text())["state"] == "interrupted"

    # a server that stopped while a job ran: the next one lists it as interrupted, not running
    record = json.loads((ws.jobs / again.id / "job.json").read_text())
    (ws.jobs / again.id / "job.json").write_text(json.dumps({**record, "state": "running"}))
    assert Jobs(ws.jobs, jobs.parse).get(again.id).state == "interrupted"
    jobs.close()


def test_start_checks_what_bas_run_checks_before_it_loads_a_model(tmp_path, tiny_model, scene):
    """A mistake in the init words or the scene is an error when Start is pressed, not when the queued run starts."""
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(scene, ws.root / "scenes" / "s")
    jobs = Jobs(ws.jobs, lambda args: commands.parse_run(args, ws))
    base = ["--scene", "scenes/s", "--out", "runs/a", "--model", str(tiny_model), "--device", "cpu"]
    masks = len(list((ws.root / "scenes" / "s").glob("mask*.png")))
    for extra, message in ((["--init-token", "teddy bear"], "--init-token 'teddy bear' is not one word; give a single word such as 'bear'"),
                           ([w for _ in range(masks + 1) for w in ("--init-token", "toy")], f"{masks + 1} --init-token values were given for {masks} masks"),
                           (["--mask-erode", "500"], "is empty after mask cleanup")):
        with pytest.raises(BasError, match=re.escape(message)):
            jobs.submit([*base, *extra], "shown")
    (ws.root / "scenes" / "s" / "mask0.png").write_bytes(b"not a png")
    with pytest.raises(BasError, match="mask0.png is not a readable image"):
        jobs.submit(base, "shown")
    assert not jobs.jobs and not any(ws.jobs.iterdir()) and not any((ws.root / "runs").iterdir())  # nothing queued, nothing written
    # the page splits its init-word field at commas only: a word with a space reaches the check above
    result = CliRunner().invoke(cli, ["run", "--scene", str(scene), "--out", str(tmp_path / "cli"), "--model", str(tiny_model), "--init-token", "teddy bear"])
    assert result.exit_code == 1 and "--init-token 'teddy bear' is not one word" in result.output, result.output


def test_bas_ui_without_gradio_says_how_to_install_it_and_another_host_needs_a_password(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    monkeypatch.delenv("BAS_UI_AUTH", raising=False)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        result = CliRunner().invoke(cli, ["ui", "--workspace", str(tmp_path / "ws"), "--host", host])
        assert result.exit_code == 1 and result.output.count("Error") == 1, result.output
        assert f"Error: --host {host} lets other machines on the network open this page and use its workspace; pass --auth USER:PASS" in result.output
        assert not (tmp_path / "ws").exists()  # refused before anything is made
    for auth in ("nopassword", ":pw", "ann:"):
        result = CliRunner().invoke(cli, ["ui", "--workspace", str(tmp_path / "ws"), "--host", "0.0.0.0", "--auth", auth])
        assert result.exit_code == 1 and "Error: --auth takes USER:PASS" in result.output, result.output
    for options, env in ((["--host", "0.0.0.0", "--auth", "ann:pw"], {}), (["--host", "0.0.0.0"], {"BAS_UI_AUTH": "ann:pw"}), (["--host", "localhost"], {})):
        result = CliRunner().invoke(cli, ["ui", "--workspace", str(tmp_path / "ws"), *options], env=env)
        assert result.exit_code == 1 and "bas ui needs gradio; install it with: pip install 'bas[ui]'." in result.output, result.output


def test_bas_ui_on_a_port_in_use_is_one_line_and_makes_no_workspace(tmp_path):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[test]')")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(cli, ["ui", "--workspace", str(tmp_path / "ws"), "--port", str(port)])
    assert result.exit_code == 1 and result.output.count("Error") == 1, result.output
    assert result.output.startswith(f"Error: Cannot listen on 127.0.0.1:{port} (Address already in use); pass another --port"), result.output
    assert not (tmp_path / "ws").exists()


def test_the_host_check_and_the_address_shown():
    from bas.ui.access import allowed_hosts, host_name, page_url

    assert [host_name(h) for h in ("127.0.0.1:7860", "[::1]:7860", "LocalHost", "evil.example.:80", "::1")] == [
        "127.0.0.1", "::1", "localhost", "evil.example.", "::1"]
    assert allowed_hosts("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert "gpu-box" in allowed_hosts("10.0.0.7", ("GPU-box",)) and "10.0.0.7" in allowed_hosts("10.0.0.7")
    assert socket.gethostname().lower() in allowed_hosts("0.0.0.0")
    assert page_url("127.0.0.1", 7860) == "http://127.0.0.1:7860/" and page_url("::1", 80) == "http://[::1]:80/"
    assert "0.0.0.0" not in page_url("0.0.0.0", 7860) and "[::]" not in page_url("::", 7860)


def test_the_runs_list_finds_runs_in_staging_folders_and_shows_no_name_bas_keeps_for_itself(tmp_path, scene, monkeypatch):
    """Since a run works (and stays, interrupted) in ``.NAME.bas-partial`` beside ``runs/NAME``, the
    list, its report view and Resume find it by ``runs/NAME``, and never take bas's staging folder,
    lock, trash or old run for a run."""
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(scene, ws.root / "scenes" / "s")
    runs = ws.root / "runs"

    def finished(name, folder=None):
        folder = folder or runs / name
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps({"bas_version": "0.1.0", "handles": ["<asset0>"], "model": "m",
                                                     "config": {"phase1_steps": 2, "phase2_steps": 2}}))

    def interrupted(name, step=2, state=None):  # the staging folder with one complete checkpoint, as a stopped run leaves it
        config, _ = commands.parse_run(["--scene", "scenes/s", "--out", f"runs/{name}", "--seed", "7"], ws)
        folder = staging_path(runs / name) / "checkpoints" / f"phase1-step{step:05d}"
        folder.mkdir(parents=True)
        state = state or {"phase": 1, "step": step, "history": {"phase1": [], "phase2": []}, "times": {}, "python_rng": [], "config": config.to_json()}
        (folder / "state.json").write_text(json.dumps(state, default=str))
        return folder

    def lock(name, pid):
        (runs / f".{name}.bas-lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": f"bas run --out runs/{name}",
                                                             "started": "2026-01-01T00:00:00", "proc_start": runfolder._proc_start(pid)}))

    finished("done")
    interrupted("first")  # a first run: nothing at runs/first yet
    (staging_path(runs / "first") / "report").mkdir()
    Image.new("RGB", (8, 8)).save(staging_path(runs / "first") / "report" / "loss-phase1.png")
    finished("redo")
    interrupted("redo", step=4)  # an --overwrite run stopped: the finished run stays in place meanwhile
    interrupted("busy")  # `bas run` working in another process, past its first checkpoint
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        lock("busy", other.pid)
        lock("stale", gone.pid)  # left by a process that no longer runs: no run
        (runs / ".gone.bas-trash-0123abcd").mkdir()
        (runs / ".cache").mkdir()
        (runs / "elsewhere").symlink_to(ws.root / "scenes")
        # complete runs whose swap a crash interrupted: the list finishes it, as any reader does, or says why it cannot
        finished("swapped", staging_path(runs / "swapped"))
        finished("blocked", staging_path(runs / "blocked"))
        (runs / "blocked").mkdir()
        (runs / "blocked" / "notes.txt").write_text("mine")

        assert [p.name for p in ws.run_folders()] == ["blocked", "busy", "done", "first", "redo", "swapped"]
        assert ws.finished_runs() == ["runs/done", "runs/redo"]  # redo's finished run is usable until the new one completes
        entries = {p.name: ws.run_entry(p) for p in ws.run_folders()}
        assert {name: e.status for name, e in entries.items()} == {"blocked": "failed", "busy": "running", "done": "finished", "first": "interrupted",
                                                                   "redo": "interrupted", "swapped": "finished"}
        assert "A finished run waits in" in entries["blocked"].note and (runs / "blocked" / "notes.txt").read_text() == "mine"
        assert (runs / "swapped" / "run.json").is_file() and not staging_path(runs / "swapped").exists()
        assert f"pid {other.pid}" in entries["busy"].note and "bas run --out runs/busy" in entries["busy"].note
        assert "the finished run it replaces stays usable" in entries["redo"].note
        assert entries["first"].path == runs / "first" and entries["first"].report == staging_path(runs / "first") / "report"
        assert entries["done"].report == runs / "done" / "report"
        for hidden in ("runs/.first.bas-partial", "runs/.busy.bas-lock", "runs/.gone.bas-trash-0123abcd"):
            with pytest.raises(BasError, match=r"is where bas keeps its own work for the run \w+; pick the run itself \(runs/\w+\)"):
                ws.run_path(hidden)

        pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[test]')")
        from bas.ui.app import App

        app = App(ws, model="m", sam_model="s", device="cpu")
        assert [e.name for e in app.run_entries()] == ["blocked", "busy", "done", "first", "redo", "swapped"]
        submitted = []
        monkeypatch.setattr(app.jobs, "submit", lambda args, shown: submitted.append(args) or shown)
        for name in ("first", "redo"):  # with the options the newest checkpoint saved
            assert re.fullmatch(r"bas run .* --resume", app.resume(ws.run_path(f"runs/{name}")))
            config, _ = commands.parse_run(submitted[-1], ws)
            assert config.resume and config.out == runs / name and config.seed == 7
        for name, message in (("busy", f"is being written by another bas process \\(pid {other.pid}"), ("done", "is finished; there is nothing to resume"),
                              ("stale", "has no checkpoint to resume from")):
            with pytest.raises(BasError, match=message):
                app.resume(ws.run_path(f"runs/{name}"))
        with pytest.raises(BasError, match="holds an interrupted run; press Resume"):
            app.check_not_overwriting(commands.parse_run(["--scene", "scenes/s", "--out", "runs/redo"], ws)[0])
        (interrupted("first", step=6, state={"phase": 1}) / "state.json").write_text("{")  # a newer, damaged checkpoint
        with pytest.raises(BasError, match=r"phase1-step00006 cannot be read .*; delete that folder to resume from an older one"):
            app.resume(ws.run_path("runs/first"))
        assert len(submitted) == 2
    finally:
        other.kill()
        other.wait()


def test_the_generate_tab_offers_the_picked_runs_family_samplers_and_defaults(tmp_path):
    """A FLUX run samples with flow-euler at FLUX.1-dev's distilled guidance 3.5, an SD run with the
    paper's DDIM at 7.5: the tab follows the run picked, and a blank guidance is the family's."""
    from safetensors.torch import save_file

    from bas.core.family import get_family
    from bas.generation.generate import SCHEDULERS
    from bas.core.plugins import Plugins

    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[test]')")
    from bas.ui.app import App

    ws = Workspace(tmp_path / "ws")
    flux_rows = {"<asset0>": torch.zeros(4), "text_encoder_2.<asset0>": torch.zeros(8)}
    schnell = "black-forest-labs/FLUX.1-schnell"  # told by its name where its transformer's config is not at hand
    for name, family, model, rows in (("sd", "sd", "m", {"<asset0>": torch.zeros(4)}), ("flux", "flux", "m", flux_rows),
                                      ("schnell", "flux", schnell, flux_rows)):
        folder = ws.root / "runs" / name
        folder.mkdir(parents=True)
        save_file(rows, str(folder / "handles.safetensors"))
        (folder / "run.json").write_text(json.dumps({"bas_version": "0.1.0", "model": model, "family": family, "handles": ["<asset0>"],
                                                     "files": ["handles.safetensors"], "resolution": 64}))
    ddpm_type = [n for n in SCHEDULERS if n != "flow-euler"]
    assert commands.sampling_choices() == {"schedulers": ddpm_type, "scheduler": "ddim", "guidance": 7.5, "steps": 50}  # before a run is picked
    app = App(ws, model="m", sam_model="s", device="cpu")
    for run, schedulers, scheduler, guidance, steps in (("runs/flux", ["flow-euler"], "flow-euler", 3.5, 50), ("runs/sd", ddpm_type, "ddim", 7.5, 50),
                                                        ("runs/schnell", ["flow-euler"], "flow-euler", 0.0, 4)):
        chips, status, sampler, scale, count = app.generate_settings(run)
        assert 'data-handle="&lt;asset0&gt;"' in chips and status.startswith("1 handles, base model ")
        assert (sampler["choices"], sampler["value"], scale["value"], count["value"]) == (schedulers, scheduler, guidance, steps), run
    _, status, _, _, _ = app.generate_settings("runs/.flux.bas-partial")
    assert "is where bas keeps its own work for the run flux" in status
    # a blank guidance is left to the family, in the command line shown too
    flux = get_family(Plugins(), "flux")
    assert commands.generate_args("runs/flux", ["p"], {"seeds": [0], "guidance": None, "scheduler": "flow-euler"}, flux) == ["runs/flux", "p", "--seeds", "0"]
    # schnell's own defaults (bas generate's for it) are left out of its command line; dev's are not its
    info = json.loads((ws.root / "runs" / "schnell" / "run.json").read_text())
    options = {"seeds": [0], "guidance": 0.0, "steps": 4, "scheduler": "flow-euler"}
    assert commands.generate_args("runs/schnell", ["p"], options, flux, info) == ["runs/schnell", "p", "--seeds", "0"]
    assert commands.generate_args("runs/flux", ["p"], options, flux) == ["runs/flux", "p", "--seeds", "0", "--steps", "4", "--guidance", "0"]


# -- the page in a real browser --------------------------------------------------------------------------
def browser_or_skip():
    for module in ("gradio", "playwright"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium; .ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(root: Path, *options, env=None):
    """``bas ui OPTIONS`` in a process of its own, from the empty folder root/cwd; returns once it printed its address."""
    port = free_port()
    log = root / "server.log"
    cwd = root / "cwd"
    cwd.mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(root / "tmp"), **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "bas.cli", "ui", "--port", str(port), *options],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    deadline = time.time() + 120
    while not re.search(r"bas ui: http://", log.read_text()):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"bas ui did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return {"url": f"http://127.0.0.1:{port}/", "port": port, "root": root, "log": log, "process": process, "cwd": cwd}


def stop_ui(server) -> None:
    server["process"].send_signal(2)  # Ctrl-C: stops cleanly
    try:
        server["process"].wait(60)
    except subprocess.TimeoutExpired:
        server["process"].kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    browser_or_skip()
    root = tmp_path_factory.mktemp("ui")
    ws = root / "workspace"
    sam = save_tiny_sam(root / "tiny-sam")
    started = start_ui(root, "--workspace", str(ws), "--model", str(tiny_model), "--sam-model", str(sam), "--device", "cpu")
    assert f"bas ui: {started['url']} (workspace" in started["log"].read_text()
    yield {**started, "workspace": ws.resolve()}
    stop_ui(started)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(server["url"])
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    copy_to = os.environ.get("BAS_UI_SCREENSHOTS")

    def shoot(page, name):
        path = folder / f"ui-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if copy_to:
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(copy_to) / path.name)
        return path

    shoot.folder = folder
    return shoot


def upload(page, button, *files):
    with page.expect_file_chooser() as chooser:
        page.click(button)
    chooser.value.set_files([str(f) for f in files])


def click_pixel(page, x, y, size):
    """Click image pixel (x, y) of the Scene tab's picture, whatever size the browser shows it."""
    box = page.locator("#scene-canvas img").bounding_box()
    page.mouse.click(box["x"] + (x + 0.5) * box["width"] / size[0], box["y"] + (y + 0.5) * box["height"] / size[1])


def drag_pixels(page, start, end, size):
    box = page.locator("#scene-canvas img").bounding_box()
    at = lambda p: (box["x"] + (p[0] + 0.5) * box["width"] / size[0], box["y"] + (p[1] + 0.5) * box["height"] / size[1])  # noqa: E731
    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(end), steps=6)
    page.mouse.up()


def text_of(page, selector):
    return page.locator(selector).inner_text()


def wait_text(page, selector, pattern, timeout=60_000):
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_contain_text(re.compile(pattern), timeout=timeout)
    return text_of(page, selector)


def open_tab(page, label):
    page.click(f"button[role=tab]:has-text('{label}')")


def export_on_page(page, run, fmt, name):
    """Export ``run`` as ``fmt`` from the Export tab and download the zip it offers."""
    from playwright.sync_api import expect

    page.locator("#export-run input").fill(run)
    page.locator("#export-run input").press("Enter")
    page.click(f"#export-format label:has-text('{fmt}')")
    page.click("#export")
    wait_text(page, "#export-status", rf"Wrote exports/{name} and {name}.zip", timeout=60_000)
    link = page.locator("#export-file a").first
    expect(link).to_have_attribute("href", re.compile(re.escape(f"{name}.zip") + "$"))
    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == f"{name}.zip"
    return zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))


def assert_diffusers_files(archive, folder, handles):
    """A diffusers export: the LoRA in diffusers keys (``load_lora_weights`` reads both styles), one textual
    inversion per handle, named by it."""
    lora = load_safetensors(archive.read(f"{folder}/lora/pytorch_lora_weights.safetensors"))
    assert lora and all(re.match(r"(unet|text_encoder)\.[\w.]+\.(lora_[AB]|(\w+_)?lora\.(down|up))\.weight$", k) for k in lora), sorted(lora)[:5]
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder"}
    for handle in handles:
        embedding = load_safetensors(archive.read(f"{folder}/embeddings/{handle[1:-1]}.safetensors"))
        assert list(embedding) == [handle] and embedding[handle].ndim == 1
    assert "pipe.load_textual_inversion" in archive.read(f"{folder}/README.md").decode()


def test_the_page_makes_masks_extracts_generates_and_exports(server, page, shots, scene, tiny_model, tmp_path):
    from playwright.sync_api import expect

    ws = server["workspace"]
    size = Image.open(scene / "img.png").size

    # Scene: upload the image, a SAM click, a negative click, a box by drag, an uploaded mask
    upload(page, "#upload-image", scene / "img.png")
    wait_text(page, "#scene-status", r"Loaded img.png \(128x128\)")
    assert list((ws / ".bas-ui" / "uploads").rglob("img.png")), "uploads land in the workspace"
    click_pixel(page, 40, 40, size)
    status = wait_text(page, "#scene-status", r"<asset0>: point at \d+,\d+")
    x, y = map(int, re.search(r"point at (\d+),(\d+)", status).groups())
    assert abs(x - 40) <= 1 and abs(y - 40) <= 1
    page.click("#click-mode label:has-text('negative')")
    click_pixel(page, 20, 100, size)
    wait_text(page, "#scene-status", r"<asset0>: negative point at")
    page.click("#click-mode label:has-text('on the concept')")
    page.click("#new-concept")
    wait_text(page, "#scene-status", r"<asset1>: click on the concept")
    drag_pixels(page, (70, 30), (110, 90), size)
    wait_text(page, "#scene-status", r"<asset1>: box 70,30 to 111,91")
    upload(page, "#upload-mask", scene / "mask1.png")
    wait_text(page, "#scene-status", r"<asset2>: mask from mask1.png")
    # an init word per concept: the field edits the selected concept (the newest, or one picked)
    init_word = page.locator("#init-word textarea, #init-word input")
    init_word.press_sequentially("box")  # typed: the field follows keystrokes
    wait_text(page, "#scene-concepts", r"<asset2>: mask mask1.png, init word 'box'")
    page.click("#concept label:has-text('<asset0>')")
    wait_text(page, "#scene-status", r"<asset0> selected")
    expect(init_word).to_have_value("")
    init_word.press_sequentially("ball")  # typed: the field follows keystrokes
    wait_text(page, "#scene-concepts", r"<asset0>: SAM .*, init word 'ball'")
    # cleanup options: the preview shows them at once, the saved masks have them
    before = page.locator("#scene-canvas img").get_attribute("src")
    page.get_by_text("Mask cleanup", exact=True).click()
    page.fill("#mask-threshold input", "0.5")
    page.locator("#fill-holes input").check()
    page.fill("#mask-dilate input", "2")
    page.locator("#mask-dilate input").press("Tab")
    wait_text(page, "#scene-status", r"Cleanup applies to the preview")
    page.wait_for_function("src => { const img = document.querySelector('#scene-canvas img'); return img && img.src !== src; }", arg=before)
    cleanup = MaskCleanup(threshold=0.5, fill_holes=True, dilate=2.0)
    concepts = text_of(page, "#scene-concepts")
    assert re.search(r"<asset0>: SAM --point \d+,\d+\+no:20,100", concepts) and "<asset1>: SAM --box 70,30,111,91" in concepts, concepts
    page.fill("#scene-name input, #scene-name textarea", "toys")
    page.click("#save-scene")
    wait_text(page, "#scene-status", r"Saved scenes/toys: mask0.png, mask1.png, mask2.png, img.png, preview.png, scene.json")
    shots(page, "scene")
    # the command line shown (SAM prompts and an uploaded mask: from the saved masks) runs as shown, to the same scene
    shown_command = page.locator("#scene-command textarea").input_value()
    result = run_shown(shown_command, tmp_path)
    assert result.returncode == 0, (shown_command, result.stderr)
    for name in ("img.png", "mask0.png", "mask1.png", "mask2.png"):
        assert np.array_equal(np.asarray(Image.open(ws / "scenes" / "toys-cli" / name)), np.asarray(Image.open(ws / "scenes" / "toys" / name))), name
    saved = ws / "scenes" / "toys"
    info = json.loads((saved / "scene.json").read_text())
    assert info["prompts"][0][0] == "--point" and info["prompts"][1] == ["--box", "70,30,111,91"] and info["prompts"][2] is None
    assert info["init_tokens"] == ["ball", "object", "box"]  # a blank word is the default one
    # the masks are what `bas masks --plugin sam-masks` makes from the same prompts, and the uploaded one unchanged
    direct = tmp_path / "direct"
    result = CliRunner().invoke(cli, ["masks", "-p", "sam-masks", "--image", str(scene / "img.png"), "--model", str(server["root"] / "tiny-sam"),
                                      "--device", "cpu", info["prompts"][0][0], info["prompts"][0][1], "--box", "70,30,111,91", "--out", str(direct),
                                      "--mask-threshold", "0.5", "--fill-holes", "--mask-dilate", "2"])
    assert result.exit_code == 0, result.output
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(saved / f"mask{i}.png")), np.asarray(Image.open(direct / f"mask{i}.png")))
    uploaded = np.asarray(Image.open(scene / "mask1.png").convert("L"))
    mask2 = np.asarray(Image.open(saved / "mask2.png"))
    assert np.array_equal(mask2, (cleanup.apply(uploaded / 255.0) * 255).round().astype(np.uint8))
    assert set(np.unique(mask2)) == {0, 255} and (mask2 > 0).sum() > (uploaded >= 128).sum()  # thresholded, then grown by 2 pixels

    # a path that leaves the workspace is refused, on the page and by the file route
    page.fill("#open-scene input", str(scene))
    page.click("#open-scene-button")
    wait_text(page, "#scene-status", r"Error: .* is outside the workspace")
    page.fill("#open-scene input", "../")
    page.click("#open-scene-button")
    wait_text(page, "#scene-status", r"Error: \.\./ is outside the workspace")
    assert page.request.get(f"{server['url']}gradio_api/file={scene / 'img.png'}").status == 403
    assert page.request.get(f"{server['url']}gradio_api/file={saved / 'preview.png'}").status == 200

    # a scene folder of the workspace opens: its image with its masks tinted (the cleanup still shown), and its init words
    page.fill("#open-scene input", "scenes/toys")
    page.click("#open-scene-button")
    wait_text(page, "#scene-status", r"Opened scenes/toys: 3 masks")
    concepts = text_of(page, "#scene-concepts")
    for i, word in enumerate(["ball", "object", "box"]):
        assert f"<asset{i}>: mask scenes/toys/mask{i}.png, init word '{word}'" in concepts, concepts
    expect(page.locator("#concept label")).to_have_text(["<asset0>", "<asset1>", "<asset2>"])
    opened = scenes.render(scenes.open_scene(Workspace(ws), "scenes/toys"), cleanup)
    expect(page.locator("#scene-canvas img")).to_have_attribute("src", scenes.data_url(opened))

    # Extract: a few steps in the background; progress reaches the end; the command line is the run's
    open_tab(page, "Extract")
    assert page.locator("#extract-scene input").input_value() == "scenes/toys"
    page.fill("#run-name input, #run-name textarea", "toys")
    page.fill("#phase1-steps input", "2")
    page.fill("#phase2-steps input", "2")
    page.locator("#phase2-steps input").press("Tab")
    page.click("#start")
    wait_text(page, "#progress", r"toys: finished in", timeout=120_000)
    command = page.locator("#run-command textarea").input_value()
    assert command.startswith(f"cd {ws}\nbas run --scene scenes/toys --out runs/toys") and "--phase1-steps 2 --phase2-steps 2" in command, command
    assert "--init-token ball --init-token object --init-token box" in command, command  # the scene's words
    run_info = json.loads((ws / "runs" / "toys" / "run.json").read_text())
    typed, _ = commands.parse_run(shlex.split(command.split("\n")[1])[2:], Workspace(ws))
    as_saved = json.loads(json.dumps(typed.to_json(), default=str))
    as_saved["options"]["quiet"] = True  # the page shows progress itself (quiet is free to differ on --resume)
    assert as_saved == run_info["config"]
    assert run_info["handles"] == ["<asset0>", "<asset1>", "<asset2>"] and run_info["config"]["init_tokens"] == ["ball", "object", "box"]
    # the loss curve: a line per phase, a point per step (steps counted across both phases) with the run's own loss
    plot = page.locator("#loss-plot")
    expect(plot.locator("[aria-label^='X-axis']")).to_have_attribute("aria-label", re.compile(r"X-axis titled 'step' .* values from 1(\.0)? to 4(\.0)?$"))
    expect(plot.locator("[aria-roledescription='point']")).to_have_count(4)
    expect(plot.locator("[aria-roledescription='line mark']")).to_have_count(2)
    points = [re.fullmatch(r"step: (\d+); loss: ([\d.e-]+); phase: phase (\d)", label).groups()
              for label in plot.locator("[aria-roledescription='point']").evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")]
    phase1, phase2 = run_info["history"]["phase1"], run_info["history"]["phase2"]
    history = [(h["step"], 1) for h in phase1] + [(len(phase1) + h["step"], 2) for h in phase2]
    assert [(int(step), int(phase)) for step, _, phase in points] == history, points
    losses = [h["loss"] for h in phase1 + phase2]
    assert all(abs(float(shown) - loss) < 1e-6 * max(1.0, abs(loss)) for (_, shown, _), loss in zip(points, losses)), (points, losses)
    page.wait_for_function("document.querySelector('#attention img') && document.querySelector('#attention img').naturalWidth > 0")
    shots(page, "extract")

    # Stop = Ctrl-C (a checkpoint), Resume = --resume; a browser that goes away does not stop a run
    page.fill("#run-name input, #run-name textarea", "long")
    page.fill("#phase1-steps input", "300")
    page.fill("#phase2-steps input", "0")
    page.fill("#more-options textarea, #more-options input", "--plugin no:report")
    page.locator("#more-options textarea, #more-options input").press("Tab")
    page.click("#start")
    wait_text(page, "#progress", r"long: (loading the model|phase 1 of 1, step)")
    page.click("#stop")
    wait_text(page, "#progress", r"long: interrupted .*Resume continues it")
    assert complete_checkpoints(ws / "runs" / "long") and not (ws / "runs" / "long" / "run.json").exists()
    page.click("#resume")
    wait_text(page, "#progress", r"long: (loading the model|phase 1 of 1, step \d+/300)")
    page.reload()  # the page goes away and comes back: it finds the run, which went on
    open_tab(page, "Extract")
    wait_text(page, "#progress", r"long: (loading the model|phase 1 of 1, step \d+/300|finished)")
    wait_text(page, "#progress", r"long: finished in", timeout=120_000)
    resumed = json.loads((ws / "runs" / "long" / "run.json").read_text())
    assert resumed["resumed"] is True and len(resumed["history"]["phase1"]) == 300

    # Generate: handles offered as chips, images on the page and in the run's samples/
    open_tab(page, "Generate")
    page.locator("#generate-run input").fill("runs/toys")
    page.locator("#generate-run input").press("Enter")
    page.locator("#handle-chips button[data-handle='<asset0>']").click()
    expect(page.locator("#prompts textarea")).to_have_value("a photo of <asset0>")
    page.fill("#seeds textarea, #seeds input", "0,1")
    page.fill("#generate-steps input", "2")
    page.click("#generate")
    wait_text(page, "#generate-status", r"Wrote 2 images into runs/toys/samples", timeout=60_000)
    page.wait_for_function("document.querySelectorAll('#generate-gallery img').length >= 2")
    assert sorted(p.name for p in (ws / "runs" / "toys" / "samples").glob("*.png")) == [
        "a-photo-of-asset0-seed0.png", "a-photo-of-asset0-seed1.png", "grid-a-photo-of-asset0-seed0.png"]
    expect(page.locator("#generate-command textarea")).to_have_value("bas generate runs/toys 'a photo of <asset0>' --seeds 0,1 --steps 2 --device cpu")
    shots(page, "generate")
    # LoRA scale 0: the handles without the phase-2 LoRA, a different image of the same seed
    sample = ws / "runs" / "toys" / "samples" / "a-photo-of-asset0-seed0.png"
    at_scale_1 = np.asarray(Image.open(sample))
    page.fill("#lora-scale input", "0")
    page.fill("#seeds textarea, #seeds input", "0")
    page.locator("#seeds textarea, #seeds input").press("Tab")
    page.click("#generate")
    wait_text(page, "#generate-status", r"Wrote 1 image into runs/toys/samples", timeout=60_000)
    expect(page.locator("#generate-command textarea")).to_have_value("bas generate runs/toys 'a photo of <asset0>' --seeds 0 --steps 2 --lora-scale 0 --device cpu")
    assert not np.array_equal(np.asarray(Image.open(sample)), at_scale_1)

    # Export: every format the tab offers downloads as a zip with its model card, and its weights open
    open_tab(page, "Export")
    expect(page.locator("#export-format label")).to_have_text(list(FORMATS))
    archive = export_on_page(page, "runs/toys", "kohya", "toys-kohya")
    wait_text(page, "#export-card", r"AUTOMATIC1111")
    names = sorted(archive.namelist())
    assert "toys-kohya/README.md" in names and "toys-kohya/toys.safetensors" in names, names
    lora = load_safetensors(archive.read("toys-kohya/toys.safetensors"))
    assert lora and all(re.match(r"lora_(unet|te)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)$", k) for k in lora), sorted(lora)[:5]
    embedding = load_safetensors(archive.read("toys-kohya/embeddings/toys-asset0.safetensors"))
    assert list(embedding) == ["emb_params"]
    shots(page, "export")

    handles = [f"<asset{i}>" for i in range(3)]
    archive = export_on_page(page, "runs/toys", "diffusers", "toys-diffusers")
    wait_text(page, "#export-card", r"load_lora_weights")
    assert sorted(archive.namelist()) == sorted(f"toys-diffusers/{n}" for n in ["README.md", "preview.png", "lora/pytorch_lora_weights.safetensors",
                                                                              *[f"embeddings/asset{i}.safetensors" for i in range(3)]])
    assert_diffusers_files(archive, "toys-diffusers", handles)

    # a LoRA from a full fine-tune: refused for the LoRA run, made for a full one (trained here on the command line)
    page.click("#export-format label:has-text('lora-from-full')")
    page.click("#export")
    wait_text(page, "#export-status", r"Error: .*toys is not a full fine-tune \(it has no pipeline/\); export it with --format diffusers or kohya")
    result = CliRunner().invoke(cli, ["run", "--scene", str(ws / "scenes" / "toys"), "--model", str(tiny_model), "--out", str(ws / "runs" / "full"),
                                      "--plugin", "full", "--phase1-steps", "1", "--phase2-steps", "1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    archive = export_on_page(page, "runs/full", "lora-from-full", "full-lora-from-full")
    assert {"full-lora-from-full/README.md", "full-lora-from-full/lora/pytorch_lora_weights.safetensors"} <= set(archive.namelist())
    assert not any("/pipeline/" in n for n in archive.namelist())
    assert_diffusers_files(archive, "full-lora-from-full", handles)

    # Runs: finished, interrupted and failed runs from the workspace, each with its report
    open_tab(page, "Runs")
    page.click("#refresh-runs")
    table = wait_text(page, "#runs-table", r"toys")
    assert "finished" in table and "long" in table
    page.locator("#runs-table").get_by_text("toys", exact=True).first.click()
    wait_text(page, "#run-details", r"toys: finished")
    page.wait_for_function("document.querySelectorAll('#run-report img').length >= 2")
    shots(page, "runs")
    # the report is a link that opens it as a page, with its pictures; nothing outside the run's report is served
    href = page.locator("#run-details a:has-text('Open the report')").get_attribute("href")
    assert href == "report/toys/index.html", href
    report_page = page.request.get(server["url"] + href)
    assert report_page.status == 200 and report_page.headers["content-type"].startswith("text/html") and "script-src 'none'" in report_page.headers["content-security-policy"]
    pictures = re.findall(r'src="([^"]+\.png)"', report_page.text())
    assert pictures and page.request.get(server["url"] + "report/toys/" + pictures[0]).headers["content-type"] == "image/png"
    for bad in ("report/toys/../run.json", "report/toys/%2e%2e/run.json", "report/..%2Fscenes/index.html", "report/nosuch/index.html"):
        assert page.request.get(server["url"] + bad).status == 404, bad

    # nothing was written outside the workspace: not in the server's folder, not in the system's temporary folder
    assert not any(server["cwd"].iterdir()) and not (server["root"] / "tmp" / "gradio").exists()
    assert not re.search(r"Traceback", server["log"].read_text()), server["log"].read_text()[-3000:]


# -- who may drive the page -------------------------------------------------------------------------------
def test_a_request_addressed_to_another_host_is_refused(server):
    """DNS rebinding: a web page that points its own name at 127.0.0.1 sends its name as Host."""
    import httpx

    port = server["port"]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil.example"):
        for path in ("", "config", "gradio_api/info", f"gradio_api/file={server['workspace']}/runs"):
            response = httpx.get(server["url"] + path, headers={"Host": host})
            assert response.status_code == 421 and "bas ui answers only to its own address" in response.text, (host, path, response.status_code)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert httpx.get(server["url"] + "config", headers={"Host": host}).status_code == 200


def test_bas_ui_on_another_host_asks_for_the_password_and_prints_an_address_that_opens(tmp_path):
    import httpx

    browser_or_skip()
    started = start_ui(tmp_path, "--workspace", str(tmp_path / "ws"), "--host", "0.0.0.0", "--auth", "ann:s3cret")
    try:
        printed = re.search(r"bas ui: (http://\S+) ", started["log"].read_text()).group(1)
        assert "0.0.0.0" not in printed and printed.endswith(f":{started['port']}/")
        with httpx.Client(base_url=started["url"]) as client:
            assert client.get("config").status_code == 401
            assert client.get("report/any/index.html").status_code == 401  # the page's own route too
            assert client.post("login", data={"username": "ann", "password": "wrong"}).status_code == 400
            assert client.get("config").status_code == 401
            assert client.post("login", data={"username": "ann", "password": "s3cret"}).status_code == 200
            assert client.get("config").status_code == 200
            assert client.get("config", headers={"Host": "evil.example"}).status_code == 421
    finally:
        stop_ui(started)


# -- one job model: every job can be stopped where it is shown, the page re-attaches to any ------------------
def start_on_page(page, scene, name, phase1, phase2="0", more="--plugin no:report --checkpoint-every 5"):
    from playwright.sync_api import expect

    open_tab(page, "Extract")
    if page.locator("#extract-scene input").input_value() != scene:
        page.locator("#extract-scene input").fill(scene)
        page.locator("#extract-scene input").press("Enter")
        expect(page.locator("#run-name input, #run-name textarea")).to_have_value(Path(scene).name, timeout=30_000)  # the scene fills it in
    page.fill("#run-name input, #run-name textarea", name)
    page.fill("#phase1-steps input", str(phase1))
    page.fill("#phase2-steps input", str(phase2))
    page.fill("#more-options textarea, #more-options input", more)
    page.locator("#more-options textarea, #more-options input").press("Tab")
    page.click("#start")


def test_every_job_stops_from_where_it_is_shown_and_the_page_reattaches_to_any(server, page, scene):
    ws = server["workspace"]
    shutil.copytree(scene, ws / "scenes" / "jobs", dirs_exist_ok=True)
    page.goto(server["url"])
    start_on_page(page, "scenes/jobs", "first", 400)
    wait_text(page, "#progress", r"first: phase 1 of 1, step \d+/400")
    wait_text(page, "#extract-status", r"Queued first")
    start_on_page(page, "scenes/jobs", "second", 2)
    wait_text(page, "#queue", r"second: queued on cpu \(1 ahead of it\)")
    wait_text(page, "#progress", r"second: queued")  # the page follows the job it started last
    # a running run of this server is running, not "interrupted", whatever checkpoints it wrote so far
    deadline = time.time() + 120
    while not complete_checkpoints(ws / "runs" / "first") and time.time() < deadline:
        time.sleep(0.2)
    start_on_page(page, "scenes/jobs", "first", 400)
    wait_text(page, "#extract-status", r"Error: first is already running; wait for it, stop it \(its Stop button in the queue\)")

    # after a reload the page follows the running job; Show follows another
    page.reload()
    open_tab(page, "Extract")
    wait_text(page, "#progress", r"first: phase 1 of 1, step")
    page.locator("#queue li[data-out='second'] button:has-text('Show')").click()
    wait_text(page, "#progress", r"second: queued")
    # the queue's Stop stops the running job the panel does not show; the queued one then runs
    page.locator("#queue li[data-out='first'] button:has-text('Stop')").click()
    wait_text(page, "#extract-status", r"Stopping first: it finishes the current step and saves a checkpoint")
    wait_text(page, "#progress", r"second: finished in", timeout=120_000)
    assert complete_checkpoints(ws / "runs" / "first") and not (ws / "runs" / "first" / "run.json").exists()

    # the Runs tab: dates, Stop for a running run, Delete
    start_on_page(page, "scenes/jobs", "third", 400)
    wait_text(page, "#progress", r"third: phase 1 of 1, step")
    open_tab(page, "Runs")
    page.click("#refresh-runs")
    wait_text(page, "#runs-table", r"third")
    table = text_of(page, "#runs-table")
    assert re.search(r"first\s+interrupted\s+\d{4}-\d\d-\d\d \d\d:\d\d", table) and re.search(r"third\s+running\s+\d{4}-", table), table
    page.locator("#runs-table").get_by_text("third", exact=True).first.click()
    wait_text(page, "#run-details", r"third: running")
    page.click("#stop-run")
    wait_text(page, "#runs-status", r"Stopping third")
    deadline = time.time() + 120
    while ws_run_status(ws, "third") != "interrupted" and time.time() < deadline:
        time.sleep(0.2)
    assert ws_run_status(ws, "third") == "interrupted"
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("#delete-run")
    wait_text(page, "#runs-status", r"Nothing deleted")
    assert complete_checkpoints(ws / "runs" / "third")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-run")
    wait_text(page, "#runs-status", r"Deleted runs/third")
    assert not any(p.name.startswith((".third.", "third")) for p in (ws / "runs").iterdir())
    expect_no_row = page.locator("#runs-table").get_by_text("third", exact=True)
    from playwright.sync_api import expect

    expect(expect_no_row).to_have_count(0, timeout=30_000)


def ws_run_status(ws, name):
    return Workspace(ws).run_entry(ws / "runs" / name).status


# -- the live view: fed from the job's files, so it survives a restart ------------------------------------------
def curve(page):
    """The loss plot's points as (step, phase), and how many lines it draws."""
    plot = page.locator("#loss-plot")
    labels = plot.locator("[aria-roledescription='point']").evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    points = [tuple(int(v) for v in re.fullmatch(r"step: (\d+); loss: [\d.e-]+; phase: phase (\d)", label).groups()) for label in labels]
    return points, plot.locator("[aria-roledescription='line mark']").count()


def wait_curve(page, phases, points, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        shown, lines = curve(page)
        if lines == phases and len(shown) == points:
            return shown
        time.sleep(0.3)
    raise AssertionError(f"the curve shows {len(shown)} points in {lines} lines, not {points} in {phases}: {shown}")


def test_the_loss_curve_shows_both_phases_on_a_first_run_and_after_a_restart_and_resume(tmp_path, tiny_model, scene, page):
    ws = tmp_path / "ws"
    shutil.copytree(scene, ws / "scenes" / "c")
    options = ["--workspace", str(ws), "--model", str(tiny_model), "--device", "cpu"]
    first = start_ui(tmp_path, *options)  # a server of its own, to kill
    browser = page.context.browser  # the module's browser (one Playwright per process)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)
    try:
        page.goto(first["url"])
        # a first run: the page sees phase 1 before phase 2 exists, and still draws phase 2
        start_on_page(page, "scenes/c", "once", 150, 3)
        wait_text(page, "#progress", r"once: phase 1 of 2, step")
        wait_text(page, "#progress", r"once: finished in", timeout=180_000)
        shown = wait_curve(page, 2, 153)
        assert shown == [(s, 1) for s in range(1, 151)] + [(s, 2) for s in range(151, 154)]

        # a server killed during a run: the next one shows the run's curve so far, and Resume carries it on
        start_on_page(page, "scenes/c", "again", 40, 3)
        deadline = time.time() + 120
        while not complete_checkpoints(ws / "runs" / "again") and time.time() < deadline:
            time.sleep(0.1)
        first["process"].kill()
        first["process"].wait()
        (tmp_path / "second").mkdir()
        second = start_ui(tmp_path / "second", *options)
        try:
            page.goto(second["url"])
            open_tab(page, "Extract")
            wait_text(page, "#progress", r"again: interrupted\. the bas ui server stopped during this run")
            page.wait_for_function("document.querySelectorAll('#loss-plot [aria-roledescription=point]').length >= 5")
            before, _ = curve(page)  # the steps until the server was killed, from the job's folder
            assert before == [(s, 1) for s in range(1, len(before) + 1)], before
            page.click("#resume")
            wait_text(page, "#progress", r"again: finished in", timeout=120_000)
            shown = wait_curve(page, 2, 43)
            assert shown == [(s, 1) for s in range(1, 41)] + [(s, 2) for s in range(41, 44)]
            page.wait_for_function("document.querySelector('#attention img') && document.querySelector('#attention img').naturalWidth > 0")
        finally:
            stop_ui(second)
    finally:
        page.close()
        if first["process"].poll() is None:
            stop_ui(first)


# -- the Scene tab: a brush, uploads at a working size, messages, the command line that runs as shown ------------------
def paint(page, start, end, size):
    """A brush stroke on the brush's picture from image pixel ``start`` to ``end`` (the editor fits the picture, centred, at its zoom)."""
    page.click("#mask-brush button[aria-label='Brush']")
    canvas = page.locator("#mask-brush canvas").first

    def layout():
        found = re.search(r"(\d+)%", page.locator("#mask-brush").inner_text())
        return canvas.bounding_box(), float(found.group(1)) / 100 if found else None

    def fitted(box, zoom):
        """The editor shows *this* picture, fitted to its canvas: an earlier, larger picture (the brush is updated
        after the scene's status says the upload loaded) would show at a zoom far too small for ``size``."""
        if not box or not zoom:
            return False
        fit = min(box["width"] / size[0], box["height"] / size[1])
        return 0.6 * fit <= zoom <= 1.05 * fit

    seen = layout()
    for _ in range(240):  # the editor fits its picture after it draws it: paint once it shows this one and holds still
        page.wait_for_timeout(250)
        now = layout()
        if now == seen and fitted(*now):
            break
        seen = now
    box, zoom = seen
    assert fitted(box, zoom), f"the brush never showed the {size[0]}x{size[1]} picture fitted to its canvas: {box}, zoom {zoom}"
    at = lambda p: (box["x"] + box["width"] / 2 + (p[0] + 0.5 - size[0] / 2) * zoom, box["y"] + box["height"] / 2 + (p[1] + 0.5 - size[1] / 2) * zoom)  # noqa: E731
    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(end), steps=20)
    page.mouse.up()


def run_shown(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command line as the page shows it, in a shell, with `bas` this checkout's."""
    bas = f"{shlex.quote(sys.executable)} -m bas.cli"
    script = re.sub(r"^bas ", bas + " ", command, flags=re.M)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_brushed_mask_saves_as_drawn_and_the_scenes_command_runs_as_shown(server, page, scene, tmp_path):
    from playwright.sync_api import expect

    ws = server["workspace"]
    page.goto(server["url"])
    expect(page.locator("#sam-status")).to_contain_text("SAM: ready", timeout=30_000)  # said at start, not in a collapsed accordion
    # a file that is not an image: a message naming it, not gradio's folder for it
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    upload(page, "#upload-image", notes)
    status = wait_text(page, "#scene-status", r"Error: notes\.txt is not a readable image")
    assert not re.search(r"[0-9a-f]{64}", status) and "uploads" not in status, status
    # a large photo is brought down to the working size; the upload itself is not kept
    Image.fromarray((np.random.RandomState(1).rand(1500, 2000, 3) * 255).astype(np.uint8)).save(tmp_path / "big.jpg", quality=90)
    upload(page, "#upload-image", tmp_path / "big.jpg")
    wait_text(page, "#scene-status", r"Loaded big\.jpg \(2000x1500, brought down to 1024x768 to work with")
    kept = [Image.open(p).size for p in (ws / ".bas-ui" / "uploads").rglob("big*.jpg")]
    assert kept == [(1024, 768)], kept

    size = Image.open(scene / "img.png").size
    upload(page, "#upload-image", scene / "img.png")
    wait_text(page, "#scene-status", r"Loaded img\.png \(128x128\)")
    page.wait_for_function("document.querySelector('#mask-brush canvas') !== null")
    page.wait_for_timeout(1000)  # the editor draws its picture
    paint(page, (20, 64), (100, 64), size)
    page.click("#use-brush")
    wait_text(page, "#scene-status", r"<asset0>: mask painted with the brush \(\d+ pixels\)")
    # a mask of another size: said aloud
    small = Image.new("L", (64, 32), 0)
    small.paste(255, (8, 8, 24, 24))
    small.save(tmp_path / "small.png")
    upload(page, "#upload-mask", tmp_path / "small.png")
    wait_text(page, "#scene-status", r"<asset1>: mask from small\.png\. It is 64x32, the image 128x128: .*stretched")
    page.fill("#scene-name input, #scene-name textarea", "painted")
    page.click("#save-scene")
    wait_text(page, "#scene-status", r"Saved scenes/painted")
    mask = np.asarray(Image.open(ws / "scenes" / "painted" / "mask0.png"))
    ys, xs = np.nonzero(mask > 127)
    assert mask[64, 20:101].min() == 255 and mask[20, :].max() == 0 and mask[110, :].max() == 0  # along the stroke, nowhere far from it
    assert 8 <= xs.min() <= 20 and 100 <= xs.max() <= 112 and 52 <= ys.min() <= 64 and 64 <= ys.max() <= 76, (xs.min(), xs.max(), ys.min(), ys.max())

    # the command line shown runs as shown and makes the same scene
    command = page.locator("#scene-command textarea").input_value()
    assert command.startswith(f"cd {ws}\nbas masks ") and "mixes" not in command, command
    result = run_shown(command, tmp_path)
    assert result.returncode == 0, result.stderr
    again = ws / "scenes" / "painted-cli"
    for name in ("img.png", "mask0.png", "mask1.png"):
        assert np.array_equal(np.asarray(Image.open(again / name)), np.asarray(Image.open(ws / "scenes" / "painted" / name))), name

    # a scene of SAM prompts only: its command is bas masks --plugin sam-masks with the prompts, and runs as shown too
    upload(page, "#upload-image", scene / "img.png")
    wait_text(page, "#scene-status", r"Loaded img\.png")
    click_pixel(page, 40, 40, size)
    wait_text(page, "#scene-status", r"<asset0>: point at")
    page.fill("#scene-name input, #scene-name textarea", "clicked")
    page.click("#save-scene")
    wait_text(page, "#scene-status", r"Saved scenes/clicked")
    command = page.locator("#scene-command textarea").input_value()
    assert "--plugin sam-masks" in command and "--point" in command and command.endswith("--out scenes/clicked-cli"), command
    result = run_shown(command, tmp_path)
    assert result.returncode == 0, (command, result.stderr)
    assert np.array_equal(np.asarray(Image.open(ws / "scenes" / "clicked-cli" / "mask0.png")), np.asarray(Image.open(ws / "scenes" / "clicked" / "mask0.png")))


# -- habits: small window, keyboard, drop, chips at the cursor, captions, the form after a reload ------------------------
def test_the_page_keeps_the_users_habits(server, page, scene, tiny_model, tmp_path):
    import base64

    from playwright.sync_api import expect

    ws = server["workspace"]
    shutil.copytree(scene, ws / "scenes" / "habits", dirs_exist_ok=True)
    page.set_viewport_size({"width": 1024, "height": 700})
    try:
        page.goto(server["url"])
        # arrow keys move between tabs, once the page's script has run (a key pressed before it does nothing)
        expect(page.locator("html[data-bas-keys=ready]")).to_have_count(1, timeout=30_000)
        page.locator("button[role=tab]:has-text('Scene')").focus()
        page.keyboard.press("ArrowRight")
        expect(page.locator("button[role=tab]:has-text('Extract')")).to_have_attribute("aria-selected", "true", timeout=30_000)
        # Start, Stop and the progress are on screen together in a small window
        for selector in ("#start", "#stop", "#progress"):
            box = page.locator(selector).bounding_box()
            assert box and box["y"] >= 0 and box["y"] + box["height"] <= 700, (selector, box)
        # the form shows the run the panel shows after a reload
        start_on_page(page, "scenes/habits", "restored", 2, 1, "--plugin no:report --seed 5")
        wait_text(page, "#progress", r"restored: finished in", timeout=120_000)
        page.reload()
        expect(page.locator("html[data-bas-keys=ready]")).to_have_count(1, timeout=30_000)
        open_tab(page, "Extract")
        expect(page.locator("#run-name input, #run-name textarea")).to_have_value("restored", timeout=30_000)
        expect(page.locator("#phase1-steps input")).to_have_value("2", timeout=30_000)
        expect(page.locator("#phase2-steps input")).to_have_value("1", timeout=30_000)
        expect(page.locator("#extract-scene input")).to_have_value("scenes/habits", timeout=30_000)
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})

    # an image dropped on the Scene tab's picture is uploaded
    open_tab(page, "Scene")
    data = base64.b64encode((scene / "img.png").read_bytes()).decode()
    page.evaluate("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const list = new DataTransfer();
        list.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.querySelector('#scene-canvas .bas-canvas').dispatchEvent(new DragEvent('drop', {dataTransfer: list, bubbles: true, cancelable: true}));
    }""", data)
    wait_text(page, "#scene-status", r"Loaded dropped\.png \(128x128\)")

    # a handle goes where the cursor is; Ctrl+Enter generates; each image has its prompt and seed as caption
    open_tab(page, "Generate")
    page.locator("#generate-run input").fill("runs/restored")
    page.locator("#generate-run input").press("Enter")
    chip = page.locator("#handle-chips button[data-handle='<asset0>']")
    expect(chip).to_be_visible(timeout=30_000)
    prompts = page.locator("#prompts textarea")
    prompts.fill("a photo of at the beach")
    prompts.evaluate("t => t.setSelectionRange(11, 11)")  # after "a photo of "
    chip.click()
    expect(prompts).to_have_value("a photo of <asset0> at the beach", timeout=30_000)
    page.fill("#seeds textarea, #seeds input", "3")
    # blank or 0 is said, not a traceback nor a silent default
    page.fill("#lora-scale input", "")
    page.click("#generate")
    wait_text(page, "#generate-status", r"Error: LoRA scale is blank; write a number such as 1")
    page.fill("#lora-scale input", "1")
    page.fill("#generate-steps input", "0")
    page.click("#generate")
    wait_text(page, "#generate-status", r"Error: --steps must be at least 1, not 0")
    page.fill("#generate-steps input", "2")
    prompts.press("Control+Enter")
    wait_text(page, "#generate-status", r"Wrote 1 image into runs/restored/samples", timeout=60_000)
    expect(page.locator("#generate-gallery")).to_contain_text("a photo of <asset0> at the beach (seed 3)", timeout=30_000)


def test_switching_to_the_full_fine_tune_unticks_the_plugins_that_need_adapters(server, page):
    """background-anchor asks the base model through the adapters, which the full fine-tune has not: the page unticks
    it when the user picks full (what bas run would refuse), and leaves the other plugins as they were."""
    from playwright.sync_api import expect

    page.goto(server["url"])
    open_tab(page, "Extract")
    box = lambda name: page.locator(f"#more-plugins label:has-text('{name}') input")  # noqa: E731
    for name in ("background-anchor", "tensorboard"):
        box(name).check()
    page.locator("#weights label:has-text('full') input").check()
    expect(box("background-anchor")).not_to_be_checked(timeout=30_000)
    expect(box("tensorboard")).to_be_checked()
    page.locator("#weights label:has-text('lora') input").check()  # the tiny model recommends nothing to tick again
    page.wait_for_timeout(1000)
    expect(box("background-anchor")).not_to_be_checked()
    expect(box("tensorboard")).to_be_checked()


def test_naming_another_model_on_the_page_moves_the_fields_left_at_the_last_ones_recommendation(server, page, tiny_model):
    """The page starts at the model of bas ui --model (the tiny one: bas run's defaults). Typing bas-mini moves every field
    the user left to bas-mini's recommended settings (and ticks the plugins it turns on); one the user typed stays; typing
    the first model back moves them back."""
    from playwright.sync_api import expect

    import bas.mini
    from bas.ui import commands

    page.goto(server["url"])
    open_tab(page, "Extract")
    tiny = commands.defaults(model=str(tiny_model))
    mini = {**tiny, **bas.mini.RECOMMENDED}
    field = {"phase1_steps": "#phase1-steps input", "phase2_steps": "#phase2-steps input"}
    lr = page.get_by_label("Phase 1 learning rate")
    seed = page.get_by_label("Seed", exact=True)
    # the form shows the newest job's settings after a reload (earlier tests ran some): start it at the tiny model's values
    model = page.locator("#extract-model textarea, #extract-model input").first
    model.fill(str(tiny_model))
    model.press("Enter")
    page.locator("#weights label:has-text('lora') input").check()
    page.wait_for_timeout(1500)  # what those two changed settles before the fields are set
    for name, selector in field.items():
        page.locator(selector).fill(str(tiny[name]))
    lr.fill(str(tiny["phase1_lr"]))
    for box in page.locator("#more-plugins input").all():
        box.uncheck()
    assert (tiny["phase1_steps"], tiny["phase2_steps"], tiny["phase1_lr"]) != (mini["phase1_steps"], mini["phase2_steps"], mini["phase1_lr"])
    page.locator("#extract-scene input").fill("scenes/toys")  # for the command shown (no scene need be saved to show it)
    page.locator("#extract-scene input").press("Enter")
    page.locator("#run-name textarea, #run-name input").first.fill("follows")
    seed.fill("7")  # the user's own value
    model.fill("bas-mini")
    model.press("Enter")
    for name, selector in field.items():
        expect(page.locator(selector)).to_have_value(str(mini[name]), timeout=30_000)
    expect(lr).to_have_value(str(mini["phase1_lr"]))
    expect(seed).to_have_value("7")
    for name in commands.optional_plugins():
        box = page.locator(f"#more-plugins label:has-text('{name}') input")
        (expect(box).to_be_checked if name in mini.get("plugins", ()) else expect(box).not_to_be_checked)()
    # the command shown leaves out what the model recommends (as left) and keeps the user's seed
    expect(page.locator("#run-command textarea")).to_have_value(
        re.compile(r"^(?=.*--model bas-mini)(?=.*--seed 7)(?!.*--phase[12]-(steps|lr))", re.S), timeout=30_000)
    page.locator(field["phase2_steps"]).fill("9")  # typed after the switch: stays when the model changes back
    model.fill(str(tiny_model))
    model.press("Enter")
    expect(page.locator(field["phase1_steps"])).to_have_value(str(tiny["phase1_steps"]), timeout=30_000)
    expect(page.locator(field["phase2_steps"])).to_have_value("9")
    expect(lr).to_have_value(str(tiny["phase1_lr"]))
    expect(seed).to_have_value("7")
