"""No lost run, no escape, no traceback: the run folder's lifecycle under faults and hostile input.

Every case of the matrix asserts one ``Error:`` line, the exit code, and the files before and
after (the whole test folder, hidden files included, by content and mode).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import bas
from bas.cli import main
from bas.core import io, runfolder
from bas.core.api import make_config
from bas.core.checkpoint import complete_checkpoints
from bas.core.errors import BasError
from bas.generation.generate import read_run
from bas.core.plugins import Plugins
from bas.core.runfolder import staging_path
from bas.core.training import NumericalError, extract

from conftest import as_an_earlier_version_wrote, snapshot
from test_eval import metric_models  # noqa: F401  (a fixture: bas eval's tiny CLIP, DINO and CLIPSeg)
from test_reliability import Fragile

QUICK = ["--phase1-steps", "1", "--phase2-steps", "1", "--quiet"]


def run_main(argv) -> tuple[int, str]:
    import io as stdio
    import contextlib

    err = stdio.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, err.getvalue()


def error_line(err: str) -> str:
    """The one line a failed command prints (warnings aside); asserts there is exactly one."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, scene, tiny_model) -> Path:
    """A finished LoRA run, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code, err = run_main(["run", "--scene", scene, "--model", tiny_model, "--out", out, *QUICK])
    assert code == 0, err
    return out


@pytest.fixture
def work(tmp_path, monkeypatch, scene, tiny_model, finished):
    """A folder to work in (the current folder), with the scene, a run and a home of its own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    shutil.copytree(scene, tmp_path / "scene")
    shutil.copytree(finished, tmp_path / "runs" / "old")
    return tmp_path


def run_args(*extra, out="runs/new", model=None):
    return ["run", "--scene", "scene", "--model", model, "--out", out, *QUICK, *extra]


# -- the matrix: refused before anything is written ------------------------------------------------
def write_bomb(d):
    Image.new("L", (64, 64)).save(d / "scene" / "img.png")  # over the limit the test sets below


def write_gap(d):
    (d / "scene" / "mask1.png").rename(d / "scene" / "mask2.png")


def write_two_images(d):
    shutil.copy(d / "scene" / "img.png", d / "scene" / "img.jpg")


def write_truncated(d):
    data = (d / "scene" / "img.png").read_bytes()
    (d / "scene" / "img.png").write_bytes(data[: len(data) // 2])


def write_one_pixel_image(d):
    Image.new("RGB", (1, 1), "red").save(d / "scene" / "img.png")


def write_not_a_run(d):
    (d / "runs" / "mine").mkdir()
    (d / "runs" / "mine" / "thesis.tex").write_text("years of work")


def write_file_out(d):
    (d / "runs" / "afile").write_text("x")


def write_live_lock(d):
    lock = d / "runs" / ".new.bas-lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "bas run --out runs/new",
                                "started": "2026-01-01T00:00:00", "proc_start": runfolder._proc_start(os.getpid())}))


def write_foreign_lock(d):
    lock = d / "runs" / ".new.bas-lock"
    lock.write_text(json.dumps({"pid": 1, "host": "another-host", "command": "bas run", "started": "2026-01-01T00:00:00"}))


MATRIX = [  # (case, prepare, extra arguments, out, message)
    ("out is a file", write_file_out, [], "runs/afile", "--out runs/afile is a file"),
    ("out is the current folder", None, [], ".", "--out . is the current folder"),
    ("out is a parent of the current folder", None, [], "..", "is a parent of the current folder"),
    ("out is the root", None, [], "/", "--out / is the root folder"),
    ("out is home", None, ["--overwrite"], "~", "is your home folder"),
    ("an output path inside out", None, ["--plugin", "tensorboard", "--logging-dir", "runs/new/tb"], "runs/new",
     "--out runs/new holds --logging-dir runs/new/tb"),
    ("out is the scene folder", None, ["--overwrite"], "scene", "--out scene holds --scene scene"),
    ("out is not a run", write_not_a_run, ["--overwrite"], "runs/mine", "it is not a bas run (it has no run.json) and holds 1 entry"),
    ("out holds a finished run", None, [], "runs/old", "already holds a finished run; pass --overwrite"),
    ("resume with nothing to resume", None, ["--resume"], "runs/old", "holds a finished run, there is nothing to resume"),
    ("resume without checkpoints", None, ["--resume"], "runs/new", "holds no complete checkpoint to resume from"),
    ("lora rank 0", None, ["--lora-rank", "0"], "runs/new", "--lora-rank must be at least 1, not 0"),
    ("nan learning rate", None, ["--phase1-lr", "nan"], "runs/new", "--phase1-lr must be a finite number, not nan"),
    ("infinite plugin option", None, ["--attention-loss-weight", "inf"], "runs/new", "--attention-loss-weight must be a finite number, not inf"),
    ("negative steps", None, ["--phase2-steps", "-1"], "runs/new", "--phase2-steps must be 0 or more, not -1"),
    ("huge seed", None, ["--seed", str(2**64)], "runs/new", "--seed must be at most 9223372036854775807"),
    ("device meta", None, ["--device", "meta"], "runs/new", "Unknown --device 'meta'"),
    ("missing gpu", None, ["--device", "cuda:3"], "runs/new", "--device cuda"),
    ("huge resolution", None, ["--resolution", "65536"], "runs/new", "--resolution must be at most 4096 pixels"),
    ("a validation cadence without a prompt", None, ["--validate-every", "2"], "runs/new", "--validate-every needs something to sample"),
    ("mask numbering gap", write_gap, [], "runs/new", "has mask2.png but no mask1.png; number the masks from 0 without gaps"),
    ("two input images", write_two_images, [], "runs/new", "has 2 input images (img.jpg, img.png); keep one img.* file"),
    ("decompression bomb", write_bomb, [], "runs/new", "pixels, PIL's limit against decompression bombs"),
    ("truncated image", write_truncated, [], "runs/new", "is not a readable image"),
    ("a 1x1 image", write_one_pixel_image, [], "runs/new", "The image is 1x1 pixels, too small to hold a concept"),
    ("a live run holds the lock", write_live_lock, ["--overwrite"], "runs/new", "is in use by another bas process (pid"),
    ("a lock from another host", write_foreign_lock, [], "runs/new", "pid 1 on another-host"),
    ("out below a file", write_file_out, [], "runs/afile/new", "which is a file; pass a folder path"),  # check_target, before the lock
    ("out is bas's own staging name", None, [], "runs/.old.bas-partial", "is a name bas uses for its own work"),
    ("a model that cannot load, into new folders", None, ["--model", "no-such/model"], "deep/er/new", "Could not load model 'no-such/model'"),
    ("a family that does not match the model", None, ["--family", "flux"], "deep/er/new",
     "its model_index.json names a StableDiffusionPipeline, which the sd family loads; pass --family sd or leave --family out"),
]


@pytest.mark.parametrize("case, prepare, extra, out, message", MATRIX, ids=[m[0] for m in MATRIX])
def test_refused_runs_change_no_file(case, prepare, extra, out, message, work, tiny_model, monkeypatch):
    if prepare:
        prepare(work)
    if prepare is write_bomb:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    before = snapshot(work)
    code, err = run_main(run_args(*extra, out=out, model=tiny_model))
    assert code == 1 and message in error_line(err)
    assert snapshot(work) == before


@pytest.mark.parametrize("model, family, owner", [("tiny_flux_model", "sd", "flux"), ("tiny_model", "sdxl", "sd"), ("tiny_sdxl_model", "sd", "sdxl")])
def test_a_wrong_family_is_named_from_model_index_before_any_weight_loads(model, family, owner, work, request, monkeypatch):
    import diffusers

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", no_weights)
    before = snapshot(work)
    code, err = run_main(run_args("--family", family, model=request.getfixturevalue(model)))
    assert code == 1 and f"--family {family} does not match" in error_line(err) and f"pass --family {owner} or leave --family out" in err
    assert snapshot(work) == before


def test_a_wrong_family_for_a_hub_id_is_named_from_the_cached_model_index(work, monkeypatch):
    """A hub id whose model_index.json the hub client has cached: the mismatch is named from that
    file alone (offline), not blamed on the connection."""
    import huggingface_hub

    snapshot_dir = work / "hub" / "models--acme--fluxy" / "snapshots" / "abc123"
    snapshot_dir.mkdir(parents=True)
    (snapshot_dir / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (work / "hub" / "models--acme--fluxy" / "refs").mkdir()
    (work / "hub" / "models--acme--fluxy" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(work / "hub"))
    before = snapshot(work)
    code, err = run_main(run_args("--family", "sd", model="acme/fluxy"))
    assert code == 1 and "--family sd does not match acme/fluxy: its model_index.json names a FluxPipeline" in error_line(err)
    assert snapshot(work) == before


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl_model", "tiny_flux_model"])
def test_a_handle_as_init_word_is_refused_in_every_family(model, work, request):
    before = snapshot(work)
    code, err = run_main(run_args("--init-token", "<asset0>", "--init-token", "ball", model=request.getfixturevalue(model)))
    assert code == 1 and "--init-token '<asset0>' is a handle, the new word bas trains" in error_line(err)
    assert snapshot(work) == before


def test_init_words_are_looked_up_before_any_handle_is_added(tiny_flux_model):
    """add_handles itself (the API below the config's check) refuses a handle as init word, and a
    plain word's row is the one the unchanged vocabulary gives it, in each text encoder."""
    from bas.core.handles import add_handles
    from bas.plugins.flux import Flux

    encoders = Flux().load(str(tiny_flux_model)).text_encoders
    sizes = [len(e.tokenizer) for e in encoders]
    with pytest.raises(BasError, match="is a handle"):
        add_handles(encoders, 2, ["ball", "x <asset1>"])
    assert [len(e.tokenizer) for e in encoders] == sizes
    rows = [e.model.get_input_embeddings().weight[e.tokenizer.encode("ball", add_special_tokens=False)[0]].clone() for e in encoders]
    _, _, embeddings = add_handles(encoders, 1, ["ball"])
    for row, embedding in zip(rows, embeddings):
        assert torch.equal(embedding.handles[0], row.float())


# -- failures late in a run: the old run stays whole and usable ------------------------------------
def run_fragile(tmp, scene, model, out, **values):
    pm = Plugins([], extra=[("fragile", Fragile("nan"))])
    values = {"scene": scene, "model": str(model), "out": out, "quiet": True, "phase1_steps": 5, "phase2_steps": 2, **values}
    return extract(make_config(pm, values, ["fragile"]), pm)


def test_overwrite_that_fails_late_keeps_the_old_run_usable(work, tiny_model):
    old = work / "runs" / "old"
    before = snapshot(old)
    with pytest.raises(NumericalError, match="--resume|phase 1 step 3"):
        run_fragile(work, work / "scene", tiny_model, old, overwrite=True)
    assert snapshot(old) == before
    assert read_run(old)["handles"] == ["<asset0>", "<asset1>"]  # every check a reader makes passes
    paths = bas.generate(old, "a photo of <asset1>", num_images=1, steps=1, device="cpu")
    assert paths[0].is_file()
    # the failed run waits beside it, resumable, and holds the lock no longer
    assert (staging_path(old) / "checkpoints" / "phase1-step00002").is_dir()
    assert not (work / "runs" / ".old.bas-lock").exists()


def test_disk_full_while_writing_the_run_leaves_out_as_it_was(work, tiny_model, monkeypatch):
    old = work / "runs" / "old"
    before = snapshot(old)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)

    with monkeypatch.context() as patch:
        patch.setattr(io, "save_file", full)  # the final handles file: after the phase-1 checkpoint
        code, err = run_main(run_args("--overwrite", out="runs/old", model=tiny_model))
    line = error_line(err)
    assert code == 1 and "the disk is full" in line and "run the same command with --resume added" in line
    assert snapshot(old) == before
    assert sorted(p.name for p in (work / "runs").iterdir()) == [".old.bas-partial", "old"]  # no lock, no stray files
    code, err = run_main(run_args("--resume", out="runs/old", model=tiny_model))
    assert code == 0, err
    assert read_run(old)["resumed"] and not staging_path(old).exists()


def mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def make(name: str, options: str) -> Path:
        path = tmp_path / name
        if not mount_tmpfs(path, options):
            pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_really_full_disk(tmpfs, work, tiny_model):
    disk = tmpfs("disk", "size=160k")
    before = snapshot(disk)
    code, err = run_main(run_args("--checkpoint-every", "0", out=disk / "run", model=tiny_model))
    line = error_line(err)
    assert code == 1 and "the disk is full" in line
    assert snapshot(disk) == before  # nothing resumable was saved, so nothing stays


def test_a_read_only_folder(tmpfs, work, tiny_model, finished):
    disk = tmpfs("ro", "size=1m,ro")
    before = snapshot(disk)
    code, err = run_main(run_args(out=disk / "run", model=tiny_model))
    assert code == 1 and "Cannot write beside --out" in error_line(err) and "Read-only file system" in err
    assert snapshot(disk) == before
    # a run on a read-only disk can still be read (and generated from, into a writable folder)
    copy = tmpfs("copy", "size=4m")
    shutil.copytree(finished, copy / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(copy)], check=True)
    assert read_run(copy / "run")["handles"] == ["<asset0>", "<asset1>"]
    code, err = run_main(["generate", copy / "run", "a photo of <asset0>", "--steps", "1", "--num-images", "1"])
    assert code == 1 and "the file system is read-only" in error_line(err)


# -- readers refuse damaged, mixed and crafted folders ---------------------------------------------
def rewrite_json(out: Path, change) -> None:
    info = json.loads((out / "run.json").read_text())
    change(info)
    (out / "run.json").write_text(json.dumps(info))


def other_handles(out: Path) -> None:  # another run's handles: same names, same size, other values
    handles = load_file(str(out / "handles.safetensors"))
    save_file({k: v + 1 for k, v in handles.items()}, str(out / "handles.safetensors"))


def crafted_escape(out: Path) -> None:
    """A folder made to attack: a handle named as a path, with run.json and checksums agreeing."""
    save_file({"../../escaped": torch.zeros(32)}, str(out / "handles.safetensors"))

    def change(info):
        info["handles"] = ["../../escaped"]
        info["checksums"] = runfolder.checksums(out, ["handles.safetensors", "lora/pytorch_lora_weights.safetensors"])
    rewrite_json(out, change)


DAMAGED = [  # (case, damage, message)
    ("handles from another run", other_handles, "is damaged or mixed: handles.safetensors is not the file its run wrote"),
    ("lora missing", lambda o: (o / "lora" / "pytorch_lora_weights.safetensors").unlink(), "is incomplete: lora/pytorch_lora_weights.safetensors"),
    ("lora truncated", lambda o: (o / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"\0" * 10), "is damaged or mixed"),
    ("run.json not json", lambda o: (o / "run.json").write_text("{"), "is not valid JSON"),
    ("run.json a list", lambda o: (o / "run.json").write_text("[]"), "does not hold a run's record"),
    ("run.json without handles", lambda o: rewrite_json(o, lambda i: i.pop("handles")), "has no valid 'handles'"),
    ("a listed file outside", lambda o: rewrite_json(o, lambda i: i["files"].append("../../etc/passwd")), "which is not inside"),
    ("a checksum path outside", lambda o: rewrite_json(o, lambda i: i["checksums"].update({"/etc/passwd": {"bytes": 1}})), "which is not inside"),
    ("handles disagree", lambda o: rewrite_json(o, lambda i: i.update(handles=["<asset0>"], checksums={}, sealed_folders=[])), "is mixed: handles.safetensors holds <asset0>, <asset1> but run.json lists <asset0>"),
    ("crafted handle name", crafted_escape, "lists the handles ['../../escaped']"),
    ("resolution not a number", lambda o: rewrite_json(o, lambda i: i.update(resolution="big")), "has no valid 'resolution'"),
]
READERS = [
    ["generate", "{out}", "a photo of <asset0>", "--steps", "1", "--num-images", "1"],
    ["export", "{out}", "--format", "kohya", "--out", "{work}/exported", "--no-preview"],
    ["edit", "{out}", "a photo of <asset0>", "--image", "{work}/scene/img.png", "--mask", "{work}/scene/mask0.png", "--steps", "1"],
]


@pytest.mark.parametrize("case, damage, message", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_readers_refuse_a_damaged_or_mixed_run_folder(case, damage, message, work):
    out = work / "runs" / "old"
    damage(out)
    before = snapshot(work)
    for reader in READERS:
        code, err = run_main([a.format(out=out, work=work) for a in reader])
        assert code == 1 and message in error_line(err), reader[0]
        assert snapshot(work) == before
    assert not (work / "escaped").exists() and not list(work.parent.glob("escaped*"))


@pytest.mark.parametrize("entry, what", [
    (".old.bas-partial", "the staging folder"),  # a complete run waiting to be swapped in: readable, but not the run
    (".old.bas-old", "the previous run set aside during a swap"),
    (".old.bas-lock", "the lock file"),
])
def test_readers_refuse_the_entries_bas_keeps_beside_a_run_naming_the_run(entry, what, work):
    runs = work / "runs"
    if entry.endswith("lock"):
        (runs / entry).write_text('{"pid": 1, "host": "elsewhere", "command": "bas run", "started": "2026-01-01T00:00:00"}')
    else:
        shutil.copytree(runs / "old", runs / entry)
    (work / "linked").symlink_to(runs / entry)
    before = snapshot(work)
    for given in (runs / entry, work / "linked"):
        for reader in READERS:
            code, err = run_main([a.format(out=given, work=work) for a in reader])
            line = error_line(err)
            assert code == 1 and f"is {what} that bas keeps beside the run " in line and line.endswith("runs/old itself."), (reader[0], line)
            assert snapshot(work) == before


def test_readers_take_a_run_an_earlier_version_wrote(work):
    """A run.json without the files' sizes and hashes (bas before the run-folder checks) has nothing
    to verify, which is no damage: generate, export and edit read the run as before, and the checks
    that need no record (the files it lists, the handles) still hold."""
    out = as_an_earlier_version_wrote(work / "runs" / "old")
    before = snapshot(out)
    for reader in READERS:
        code, err = run_main([a.format(out=out, work=work) for a in reader])
        assert code == 0, (reader[0], err)
    assert list((out / "samples").glob("*.png")) and list((out / "edits").glob("*.png")) and (work / "exported" / "README.md").is_file()
    assert {k: v for k, v in snapshot(out).items() if k.split("/")[0] not in ("samples", "edits")} == before
    (out / "lora" / "pytorch_lora_weights.safetensors").unlink()
    code, err = run_main(READERS[0][:1] + [str(out)] + READERS[0][2:])
    assert code == 1 and "is incomplete: lora/pytorch_lora_weights.safetensors" in error_line(err)


@pytest.mark.parametrize("dest, message", [
    ("~", "is your home folder"),
    ("runs/mine", "holds thesis.tex, which no export writes, and --overwrite replaces the whole folder"),
    ("scene", "holds img.png and 2 more, which no export writes"),
])
def test_export_never_replaces_a_folder_that_is_not_an_export(dest, message, work):
    write_not_a_run(work)
    before = snapshot(work)
    code, err = run_main(["export", "runs/old", "--out", dest, "--overwrite", "--no-preview"])
    assert code == 1 and message in error_line(err)
    assert snapshot(work) == before


def test_export_refuses_a_crafted_handle_even_past_the_reader(work):
    """The check where a name becomes a path holds without read_run's."""
    from bas.exports.export import write_textual_inversions
    from bas.plugins.sd import StableDiffusion

    with pytest.raises(BasError, match="invalid handle name '../x'"):
        write_textual_inversions(StableDiffusion(), {"../x": {"text_encoder": torch.zeros(4)}}, work / "emb")
    assert not (work / "x.safetensors").exists() and not (work / "emb").exists()


def test_an_interrupted_run_is_named_as_such_by_readers_and_a_damaged_checkpoint_refused(work, tiny_model):
    with pytest.raises(NumericalError):
        run_fragile(work, work / "scene", tiny_model, work / "runs" / "new")
    code, err = run_main(["generate", "runs/new", "a photo of <asset0>"])
    assert code == 1 and "holds an interrupted run, not a finished one; continue it with `bas run ... --resume`" in error_line(err)
    saved = staging_path(work / "runs" / "new") / "checkpoints" / "phase1-step00002"
    for damage in (lambda: (saved / "state.json").write_text('{"phase": 1}'), lambda: (saved / "optimizer.pt").write_bytes(b"junk")):
        damage()
        before = snapshot(work)
        with pytest.raises(BasError, match="phase1-step00002 cannot be read .*; start over with --overwrite instead of --resume"):
            run_fragile(work, work / "scene", tiny_model, work / "runs" / "new", resume=True)
        assert snapshot(work) == before


# -- resume: the same inputs, the same folder by any path ------------------------------------------
def test_resume_notices_changed_inputs_and_accepts_the_folder_by_another_path(work, tiny_model):
    out = work / "runs" / "new"
    with pytest.raises(NumericalError):  # stops at phase 1 step 3, with step 2 saved
        run_fragile(work, work / "scene", tiny_model, out)
    original = (work / "scene" / "img.png").read_bytes()
    Image.open(work / "scene" / "img.png").rotate(3).save(work / "scene" / "img.png")  # same path, other pixels
    before = snapshot(work)
    with pytest.raises(BasError, match="The input image or masks differ from those the interrupted run was trained on"):
        run_fragile(work, work / "scene", tiny_model, out, resume=True)
    assert snapshot(work) == before
    (work / "scene" / "img.png").write_bytes(original)
    # the same folder through a link, the same scene by another path: it resumes (and meets the
    # same NaN at step 3, so the checks were passed and training ran from step 2)
    (work / "link").symlink_to(work / "runs")
    with pytest.raises(NumericalError, match="phase 1 step 3"):
        run_fragile(work, Path("scene/../scene"), tiny_model, Path("link/new"), resume=True)


# -- two runs at once, kill -9 during the swap -----------------------------------------------------
def bas_process(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "bas.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_a_second_run_into_the_same_out_fails_at_once(work, tiny_model):
    steps = ["--phase1-steps", "20", "--phase2-steps", "0", "--checkpoint-every", "1", "--quiet"]
    first = bas_process("run", "--scene", "scene", "--model", tiny_model, "--out", "runs/old", "--overwrite", *steps)
    lock = work / "runs" / ".old.bas-lock"
    before = snapshot(work / "runs" / "old")
    try:
        t0 = time.time()
        while not complete_checkpoints(work / "runs" / "old"):
            assert first.poll() is None and time.time() - t0 < 300, first.communicate()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # alive, and held where it is while the second run tries
        # the same folder by another path (absolute here, relative there): the same lock
        code, err = run_main(run_args("--overwrite", out=work / "runs" / "old", model=tiny_model))
        assert code == 1 and f"is in use by another bas process (pid {first.pid} on" in error_line(err)
        assert "--out runs/old --overwrite" in err and lock.is_file()
    finally:
        first.kill()
        first.communicate()
    assert snapshot(work / "runs" / "old") == before
    # its lock is stale now: the next command takes it over and resumes the killed run
    with pytest.warns(UserWarning, match=f"Took over the lock .* pid {first.pid} .* which no longer runs"):
        code, err = run_main(["run", "--scene", "scene", "--model", tiny_model, "--out", "runs/old", *steps, "--resume"])
    assert code == 0, err
    assert not lock.exists() and read_run(work / "runs" / "old")["resumed"]


def test_kill_9_during_the_final_swap_never_loses_both_runs(work, tiny_model):
    old = work / "runs" / "old"
    proc = bas_process(*run_args("--overwrite", "--seed", "7", out="runs/old", model=tiny_model), env={runfolder.KILL_ENV: "commit:old-aside"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    # killed with the old run moved aside and the new one complete beside it: --out is absent for now
    assert not old.exists() and (work / "runs" / ".old.bas-old" / "run.json").is_file()
    assert (staging_path(old) / "run.json").is_file() and (work / "runs" / ".old.bas-lock").is_file()
    info = read_run(old)  # the next command on the folder finishes the swap
    assert info["seed"] == 7 and sorted(p.name for p in (work / "runs").iterdir()) == ["old"]


def fork_and_kill_at(point: str, action) -> None:
    """Run ``action`` in a child process killed outright at ``point``, as a power loss would."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.environ[runfolder.KILL_ENV] = point
        try:
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def make_run(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "handles.safetensors").write_text(tag)
    (folder / "checkpoints").mkdir()
    (folder / "run.json").write_text(json.dumps({"bas_version": "x", "tag": tag}))
    return folder


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("point, complete, expected", [
    ("commit:before-swap", True, "new"),
    ("commit:old-aside", True, "new"),
    ("commit:new-in", True, "new"),
    ("commit:old-aside", False, "old"),  # the new run lost (deleted by hand): the old one comes back
])
def test_every_instant_of_the_swap_recovers_to_one_whole_run(point, complete, expected, tmp_path):
    out = make_run(tmp_path / "out", "old")
    make_run(staging_path(out), "new")
    fork_and_kill_at(point, lambda: runfolder.swap_in(staging_path(out), out))
    if not complete:
        shutil.rmtree(staging_path(out), ignore_errors=True)
    runfolder.settle(out)
    assert json.loads((out / "run.json").read_text())["tag"] == expected
    assert (out / "handles.safetensors").read_text() == expected  # never a mix of the two
    if expected == "new":
        assert not (out / "checkpoints").exists()  # the staging folder's checkpoints stay out of a finished run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- silently wrong inputs ---------------------------------------------------------------------------
def pixel(img: Image.Image, xy=(0, 0)) -> tuple:
    return img.getpixel(xy)


def test_transparent_images_are_composited_over_white_as_viewers_show_them(tmp_path):
    from bas.core.scene import load_image

    rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 0))  # invisible green under a transparent pixel
    rgba.putpixel((1, 1), (10, 200, 30, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and pixel(img) == (255, 255, 255) and pixel(img, (1, 1)) == (10, 200, 30)
    assert pixel(img, (2, 2)) in {(127, 127, 127), (128, 128, 128)}
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert pixel(img) == (255, 255, 255) and pixel(img, (1, 1)) == (255, 0, 0)
    Image.new("LA", (4, 4), (40, 0)).save(tmp_path / "la.png")
    assert pixel(load_image(tmp_path / "la.png")) == (255, 255, 255)
    opaque = Image.new("RGBA", (4, 4), (9, 8, 7, 255))
    opaque.save(tmp_path / "o.png")
    assert pixel(load_image(tmp_path / "o.png")) == (9, 8, 7)


def test_sixteen_bit_float_cmyk_and_rotated_images_read_as_they_look(tmp_path):
    from bas.core.scene import load_image

    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(tmp_path / "g16.png")  # mid grey at 16 bits
    assert pixel(load_image(tmp_path / "g16.png")) == (128, 128, 128)  # PIL's own conversion gives white
    Image.fromarray(np.full((4, 4), 0.25, np.float32)).save(tmp_path / "f.tiff")
    assert pixel(load_image(tmp_path / "f.tiff")) == (64, 64, 64)
    Image.fromarray(np.full((4, 4), 3.0, np.float32)).save(tmp_path / "hdr.tiff")
    with pytest.raises(BasError, match="floating-point image with values outside 0-1"):
        load_image(tmp_path / "hdr.tiff")
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    r, g, b = pixel(load_image(tmp_path / "c.jpg"))
    assert r > 200 and g < 40 and b < 40
    wide = Image.new("RGB", (32, 16), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    wide.save(tmp_path / "r.jpg", exif=exif, quality=100)
    shown = load_image(tmp_path / "r.jpg")
    assert shown.size == (16, 32) and sum(pixel(shown, (12, 3))) > 600 and sum(pixel(shown, (3, 3))) < 60  # top-left shown top-right


def test_multi_frame_images_warn_and_sixteen_bit_masks_keep_their_softness(tmp_path):
    from bas.core.scene import load_image, load_mask

    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="has 2 frames"):
        load_image(tmp_path / "anim.gif")
    Image.fromarray(np.full((4, 4), 16384, np.uint16)).save(tmp_path / "m16.png")
    assert load_mask(tmp_path / "m16.png")[0, 0] == pytest.approx(0.25, abs=1e-3)  # not stretched to 1
    Image.fromarray(np.full((4, 4), -1.0, np.float32)).save(tmp_path / "mf.tiff")
    with pytest.raises(BasError, match="mf.tiff: the mask holds negative"):
        load_mask(tmp_path / "mf.tiff")


def test_a_handle_past_the_token_limit_is_an_error_not_cut_off(finished, tmp_path):
    out = tmp_path / "samples"
    long = "a photo of " + "very " * 80 + "<asset1>"
    code, err = run_main(["generate", finished, long, "--steps", "1", "--num-images", "1", "--out-dir", out])
    assert code == 1 and "its handle <asset1> comes after the text encoder's limit of 77" in error_line(err)
    assert not out.exists()
    from transformers import CLIPTokenizer

    from bas.core.handles import check_prompt_fits

    import warnings

    tokenizer = CLIPTokenizer.from_pretrained(str(read_run(finished)["model"]), subfolder="tokenizer")
    tokenizer.add_tokens(["<asset0>"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompt_fits(tokenizer, "a photo of <asset0> at the beach")
    with pytest.warns(UserWarning, match="the rest is ignored"):  # words past the limit: a warning
        check_prompt_fits(tokenizer, "a photo of <asset0> " + "and more " * 80)
    with pytest.raises(BasError, match="its handle <asset0> comes after"):
        check_prompt_fits(tokenizer, "and more " * 80 + "<asset0>")


def test_prompts_files_that_are_not_text(tmp_path, finished):
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe\x00a\x00b")
    code, err = run_main(["generate", finished, "--prompts-file", tmp_path / "p.txt"])
    assert code == 1 and "is not UTF-8 text" in error_line(err)


# -- outputs: modes, the progress bar's line ---------------------------------------------------------
def test_every_output_gets_the_usual_mode(finished):
    mask = io.current_umask()
    for path in [finished, *finished.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~mask, f"{path}: {oct(mode)}"


def test_the_nan_message_starts_on_a_line_of_its_own(scene, tiny_model, tmp_path, capsys):
    pm = Plugins([], extra=[("fragile", Fragile("nan"))])
    values = {"scene": scene, "model": str(tiny_model), "out": tmp_path / "out", "phase1_steps": 5, "phase2_steps": 0}
    with pytest.raises(NumericalError):
        extract(make_config(pm, values, ["fragile"]), pm)
    err = capsys.readouterr().err
    assert "phase 1 (handles)" in err and err.endswith("\n")  # the bar ended its line


# -- plugins: installed is not enabled -------------------------------------------------------------
class FakeEntryPoint:
    def __init__(self, name, load, dist=None):
        self.name, self.value, self.dist, self._load = name, f"{name}_pkg", dist, load
        self.loaded = 0

    def load(self):
        self.loaded += 1
        return self._load()


def hostile_plugins(monkeypatch):
    import types

    import click

    from bas.core import plugins as plugins_module

    def exits():
        sys.exit(3)

    def shadows():
        module = types.ModuleType("shadow")

        @bas.hookimpl
        def bas_register_commands(cli):
            cli.add_command(click.Command("run", callback=lambda: print("hijacked")))
            cli.add_command(click.Command("hello", callback=lambda: print("hello from a plugin")))
            cli.commands.pop("generate", None)

        module.bas_register_commands = bas_register_commands
        return module

    eps = {"exits": FakeEntryPoint("exits", exits), "shadow": FakeEntryPoint("shadow", shadows)}
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: eps)
    return eps


def test_installed_plugins_cannot_exit_bas_or_replace_its_commands(monkeypatch, capsys, scene, tiny_model, tmp_path):
    import click

    from bas.cli import BasGroup, add_plugin_commands

    eps = hostile_plugins(monkeypatch)
    code, err = run_main(["run", "--scene", scene, "--model", tiny_model, "--out", tmp_path / "o", "--quiet", "--phase1-steps", "1", "--phase2-steps", "0"])
    assert code == 0 and eps["exits"].loaded == 0 and eps["shadow"].loaded == 0  # not even imported
    group = BasGroup(commands={"run": click.Command("run"), "generate": click.Command("generate")})
    warnings = add_plugin_commands(group)
    assert {"run", "generate", "hello"} <= set(group.commands) and group.commands["run"].callback is None
    assert any("'exits' was skipped: Error importing plugin 'exits': it called sys.exit(3)" in w for w in warnings)
    assert any("adds a command 'run', which bas has already" in w for w in warnings)
    code, err = run_main(["plugins"])
    out = capsys.readouterr().out
    assert code == 0 and "exits  [broken: Error importing plugin 'exits': it called sys.exit(3)]" in out
    assert "lora  [on by default" in out and "shadow  [opt-in" in out and "could not be loaded (exits)" in err
    code, err = run_main(["run", "--plugin", "exits", "--out", tmp_path / "p"])
    assert code == 1 and "Error importing plugin 'exits': it called sys.exit(3)" in error_line(err)


# -- files never leave their folder: links out of run, scene and export folders ---------------------
def secret(d: Path) -> Path:
    """A file the user can read that must never end up in a run or an export."""
    path = d / "private" / "secret.png"
    path.parent.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    return path


def link_in_report(d):  # a shared run folder with a link planted as its newest validation grid
    report = d / "runs" / "old" / "report"
    report.mkdir(exist_ok=True)
    (report / "validation-phase9-step99999.png").symlink_to(secret(d))


def link_in_earlier_report(d):  # the same in a run an earlier bas wrote, which has no record to check against
    as_an_earlier_version_wrote(d / "runs" / "old")
    link_in_report(d)


def link_as(name, inside=False):
    """``name`` of the run replaced by a link to a copy of it: elsewhere, or in the run's own ``samples/``
    (where generate writes, which run.json does not cover)."""
    def prepare(d):
        target = d / "runs" / "old" / name
        copy = (d / "runs" / "old" / "samples" if inside else d / "private") / Path(name).name
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(target, copy)  # the very same content
        target.unlink()
        target.symlink_to(copy)
    return prepare


def file_added(d):
    shutil.copy(d / "runs" / "old" / "inputs" / "mask0.png", d / "runs" / "old" / "inputs" / "mask9.png")


def scene_image_linked_out(d):
    (d / "scene" / "img.png").unlink()
    (d / "scene" / "img.png").symlink_to(secret(d))


EXPORT = ["export", "runs/old", "--out", "exported"]
GENERATE = ["generate", "runs/old", "a photo of <asset0>", "--steps", "1", "--num-images", "1"]
LINKED = [  # (case, prepare, arguments, message)
    ("export copies a linked preview", link_in_report, EXPORT, "report/validation-phase9-step99999.png is a link, which no run writes"),
    ("export --no-preview of a linked preview", link_in_report, EXPORT + ["--no-preview"], "report/validation-phase9-step99999.png is a link"),
    ("generate from a folder with a link", link_in_report, GENERATE, "report/validation-phase9-step99999.png is a link"),
    ("an earlier version's run with a linked preview", link_in_earlier_report, EXPORT, "which leads outside"),
    ("run.json a link out", link_as("run.json"), GENERATE, "names 'run.json', which leads outside"),
    ("handles a link to the same content elsewhere", link_as("handles.safetensors"), EXPORT + ["--no-preview"], "which leads outside"),
    ("handles a link to the same content in the run", link_as("handles.safetensors", inside=True), EXPORT + ["--no-preview"],
     "handles.safetensors is a link, where its run wrote a file"),
    ("an input a link to the same content in the run", link_as("inputs/mask0.png", inside=True), GENERATE, "inputs/mask0.png is a link"),
    ("a file added to the run's inputs", file_added, GENERATE, "inputs/mask9.png is not a file its run wrote"),
    ("a scene image linked out", scene_image_linked_out, run_args(out="runs/new"), "names 'img.png', which leads outside"),
]


@pytest.mark.parametrize("case, prepare, args, message", LINKED, ids=[c[0] for c in LINKED])
def test_no_file_is_read_or_copied_through_a_link_out_of_its_folder(case, prepare, args, message, work, tiny_model):
    prepare(work)
    before = snapshot(work)
    code, err = run_main([str(tiny_model) if a is None else a for a in args])
    assert code == 1 and message in error_line(err)
    assert snapshot(work) == before and not (work / "exported").exists()


# the same rule for model folders: --model of bas run, and the model a run's run.json names, which
# generate, edit, export (its preview) and eval load
EDIT = ["edit", "runs/old", "a photo of <asset0>", "--image", "scene/img.png", "--mask", "scene/mask0.png", "--steps", "1"]
EVAL = ["eval", "runs/old", "--out", "evaluated", "--num-images", "1", "--steps", "1", "--quiet", "--class-word", "toy", "--class-word", "box",
        "--clip-model", "{clip}", "--dino-model", "{dino}", "--segmenter-model", "{clipseg}"]
MODEL_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def model_linked_out(name=MODEL_WEIGHTS):
    """A copy of the run's model with ``name`` a link to the very same content elsewhere (loads as
    before: only the rule tells it apart); the run's run.json names the copy."""
    def prepare(d):
        model = shutil.copytree(Path(json.loads((d / "runs" / "old" / "run.json").read_text())["model"]), d / "model")
        (d / "private").mkdir(exist_ok=True)
        copy = shutil.copy(model / name, d / "private" / Path(name).name)
        (model / name).unlink()
        (model / name).symlink_to(copy)
        rewrite_json(d / "runs" / "old", lambda info: info.update(model=str(model)))
    return prepare


def model_sharded_out(d):
    """A copy of the model whose UNet weights are 'sharded': the index names a shard outside the folder."""
    model_linked_out()(d)
    unet = d / "model" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = load_file(str(d / "private" / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../../private/diffusion_pytorch_model.safetensors" for k in keys}}))


def clip_linked_out(d):
    """A copy of bas eval's CLIP model (the metric models are model folders too) with its config linked out."""
    clip = Path(str(d / "clip"))
    (d / "private").mkdir(exist_ok=True)
    (clip / "config.json").unlink()
    (clip / "config.json").symlink_to(shutil.copy(d / "metric" / "clip" / "config.json", d / "private" / "config.json"))


MODEL_LINK = "Model folder model holds the link unet/diffusion_pytorch_model.safetensors, which leads outside it"
MODEL_LINKED = [  # (case, prepare, arguments, message)
    ("run --model", model_linked_out(), run_args(model="model"), MODEL_LINK),
    ("run --model --family", model_linked_out(), run_args("--family", "sd", model="model"), MODEL_LINK),
    ("run --model, a config linked out", model_linked_out("text_encoder/config.json"), run_args(model="model"), "holds the link text_encoder/config.json"),
    ("run --model --plan", model_linked_out(), run_args("--plan", model="model"), MODEL_LINK),
    ("generate, run.json's model", model_linked_out(), GENERATE, MODEL_LINK),
    ("edit, run.json's model", model_linked_out(), EDIT, MODEL_LINK),
    ("export's preview, run.json's model", model_linked_out(), EXPORT + ["--preview-steps", "1"], MODEL_LINK),
    ("eval, run.json's model", model_linked_out(), EVAL, MODEL_LINK),
    ("eval --clip-model", clip_linked_out, EVAL, "Model folder clip holds the link config.json, which leads outside it"),
    ("a shard outside the model", model_sharded_out, GENERATE,
     "Model folder model's unet/diffusion_pytorch_model.safetensors.index.json names '../../private/diffusion_pytorch_model.safetensors', a path outside"),
]


@pytest.mark.parametrize("case, prepare, args, message", MODEL_LINKED, ids=[c[0] for c in MODEL_LINKED])
def test_no_model_file_is_read_through_a_link_out_of_its_folder(case, prepare, args, message, work, metric_models):  # noqa: F811
    shutil.copytree(metric_models["clip"], work / "clip")
    names = {name: str(path) for name, path in metric_models.items()} | {"clip": "clip"}
    (work / "metric").symlink_to(Path(metric_models["clip"]).parent)  # where clip_linked_out finds the original
    prepare(work)
    rewrite_json(work / "runs" / "old", lambda info: info.update(model="model"))  # as the message names it
    before = snapshot(work)
    code, err = run_main([a.format(**names) for a in args])
    assert code == 1 and message in error_line(err)
    assert snapshot(work) == before and not (work / "exported").exists() and not (work / "evaluated").exists()


def test_links_inside_a_model_folder_or_into_the_hub_cache_are_read(work, monkeypatch):
    """A link that stays in the model folder is its own file; a hub id's snapshot links into the
    cache's blobs/ (as the hub client writes it), and a link out of the cache is refused."""
    from bas.core.family import check_model_files

    import huggingface_hub

    model_linked_out()(work)
    weights = work / "model" / MODEL_WEIGHTS
    weights.unlink()
    shutil.copy(work / "private" / "diffusion_pytorch_model.safetensors", work / "model" / "unet" / "weights.safetensors")
    weights.symlink_to("weights.safetensors")
    rewrite_json(work / "runs" / "old", lambda info: info.update(model="model"))
    code, err = run_main(GENERATE)
    assert code == 0, err
    repo = work / "hub" / "models--acme--tiny"
    shutil.copytree(work / "model", repo / "blobs", symlinks=True)
    snap = repo / "snapshots" / "abc123"
    for path in sorted((repo / "blobs").rglob("*")):
        if path.is_file() and not path.is_symlink():
            (snap / path.relative_to(repo / "blobs")).parent.mkdir(parents=True, exist_ok=True)
            (snap / path.relative_to(repo / "blobs")).symlink_to(os.path.relpath(path, (snap / path.relative_to(repo / "blobs")).parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(work / "hub"))
    check_model_files("acme/tiny")  # every link leads into the cache: no error
    (snap / "vae" / "config.json").unlink()
    (snap / "vae" / "config.json").symlink_to(shutil.copy(repo / "blobs" / "vae" / "config.json", work / "private" / "config.json"))
    with pytest.raises(BasError, match="Model folder acme/tiny holds the link vae/config.json, which leads outside it"):
        check_model_files("acme/tiny")


def test_resume_never_reads_or_writes_through_a_link_in_the_interrupted_run(work, tiny_model):
    """The staging folder --resume continues: a checkpoint file, the checkpoints folder or the folder
    itself a link (to the very same content) is one Error line, and nothing changes."""
    out = work / "runs" / "new"
    with pytest.raises(NumericalError):
        run_fragile(work, work / "scene", tiny_model, out)
    staging = staging_path(out)
    kept = shutil.copytree(staging, work / "kept")

    def file_linked(d):
        saved = staging / "checkpoints" / "phase1-step00002" / "trainable.safetensors"
        saved.unlink()
        saved.symlink_to(shutil.copy(kept / "checkpoints" / "phase1-step00002" / "trainable.safetensors", d / "elsewhere.safetensors"))

    def folder_linked(d):
        shutil.rmtree(staging / "checkpoints")
        (staging / "checkpoints").symlink_to(shutil.copytree(kept / "checkpoints", d / "elsewhere"))

    def staging_linked(d):
        shutil.rmtree(staging)
        staging.symlink_to(shutil.copytree(kept, d / "elsewhere"))

    for damage, message in ((file_linked, "holds the link checkpoints/phase1-step00002/trainable.safetensors,"),
                            (folder_linked, "holds the link checkpoints,"), (staging_linked, "is a link,")):
        d = work / damage.__name__
        d.mkdir()
        damage(d)
        before = snapshot(work)
        with pytest.raises(BasError, match=f"The interrupted run's folder .*{message} which bas never writes .*start over with --overwrite"):
            run_fragile(work, work / "scene", tiny_model, out, resume=True)
        assert snapshot(work) == before, damage.__name__
        staging.unlink() if staging.is_symlink() else shutil.rmtree(staging)
        shutil.copytree(kept, staging)


def test_a_full_runs_pipeline_is_covered_and_never_copied_through_a_link(work, full_run_folder):
    run = work / "runs" / "full"
    shutil.copytree(full_run_folder, run)
    (run / "pipeline" / "unet" / "notes.png").symlink_to(secret(work))
    for earlier in (False, True):  # its record refuses the link; a run an earlier bas wrote has none: the copy refuses it
        if earlier:
            as_an_earlier_version_wrote(run)
        before = snapshot(work)
        code, err = run_main(["export", run, "--out", "exported", "--no-preview"])
        line = error_line(err)
        assert code == 1 and "pipeline/unet/notes.png" in line and "link" in line, line
        assert snapshot(work) == before
    other = shutil.copytree(full_run_folder, work / "runs" / "full2")
    (other / "pipeline" / "unet" / "notes.txt").write_text("added later")  # a plain file: not the run's either
    before = snapshot(work)
    code, err = run_main(["export", other, "--out", "exported", "--no-preview"])
    assert code == 1 and "pipeline/unet/notes.txt is not a file its run wrote" in error_line(err)
    assert snapshot(work) == before


# -- generate and edit never replace a file they did not write ------------------------------------
def users_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(path)  # a picture of the user's, under the name bas would give an image


def link_to_bas_png(path: Path) -> None:  # even to an image bas wrote: a link is never written through
    users_png(path.parent.parent / "private" / "elsewhere.png")
    io.save_image(path.parent.parent / "private" / "bas.png", Image.new("RGB", (8, 8)), {"command": "generate"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(path.parent.parent / "private" / "bas.png")


def a_folder(path: Path) -> None:
    (path / "inside").mkdir(parents=True)


def sample_name(command: str) -> str:
    from bas.generation.generate import image_stem
    from bas.editing.edit import slug

    return f"{image_stem('a photo of <asset0>')}-seed0.png" if command == "generate" else f"edit-{slug('a photo of <asset0>')}-seed0.png"


@pytest.mark.parametrize("out_dir", [None, "mine"], ids=["the run's folder", "--out-dir"])
@pytest.mark.parametrize("occupy", [users_png, link_to_bas_png, a_folder], ids=["a user's png", "a link", "a folder"])
@pytest.mark.parametrize("command", ["generate", "edit"])
def test_generate_and_edit_never_replace_a_file_they_did_not_write(command, occupy, out_dir, work, monkeypatch):
    args = (GENERATE if command == "generate" else EDIT) + (["--out-dir", out_dir] if out_dir else [])
    folder = work / (out_dir or f"runs/old/{'samples' if command == 'generate' else 'edits'}")
    occupy(folder / sample_name(command))
    monkeypatch.setattr("bas.generation.generate.load_run_pipeline", lambda *a, **k: pytest.fail("sampled before checking the names"))
    before = snapshot(work)
    code, err = run_main(args)
    line = error_line(err)
    assert code == 1 and f"already holds {sample_name(command)}, which bas did not write" in line and "move it away or pass another --out-dir" in line
    assert snapshot(work) == before


@pytest.mark.parametrize("command", ["generate", "edit"])
def test_generate_and_edit_replace_the_images_they_wrote_and_record_how(command, work):
    args = (GENERATE if command == "generate" else EDIT) + ["--num-images", "2"]
    code, err = run_main(args)
    assert code == 0, err
    folder = work / "runs" / "old" / ("samples" if command == "generate" else "edits")
    first = snapshot(folder)
    code, err = run_main(args[: args.index("--steps")] + ["--steps", "2"] + args[args.index("--steps") + 2 :])  # the same names, other images
    assert code == 0, err
    second = snapshot(folder)
    assert set(second) == set(first) and all(second[name] != first[name] for name in first)
    record = json.loads(Image.open(folder / sample_name(command)).info[io.IMAGE_RECORD])
    assert record["command"] == command and record["prompt"] == "a photo of <asset0>" and record["seed"] == 0 and record["steps"] == 2


@pytest.fixture(scope="module")
def full_run_folder(tmp_path_factory, scene, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    code, err = run_main(["run", "--scene", scene, "--model", tiny_model, "--out", out, "--plugin", "full", *QUICK])
    assert code == 0, err
    return out


# -- one error boundary: the same failure is one Error line and one exit code from every command ---
def safetensors_fails(code: int):
    """safetensors' writer as it fails on a full disk or past a size limit: its own SafetensorError
    (not an OSError), the operating system's error only in the message."""
    from safetensors import SafetensorError

    def save(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
    return save


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "the disk is full"), (errno.EFBIG, "the file is larger than this file system allows")])
def test_safetensors_disk_full_and_size_limit_are_one_line_from_run_and_export(code, message, work, tiny_model, monkeypatch):
    old = work / "runs" / "old"
    before = snapshot(old)
    with monkeypatch.context() as patch:
        patch.setattr(io, "save_file", safetensors_fails(code))  # the run's handles file, after the phase-1 checkpoint
        status, err = run_main(run_args("--overwrite", out="runs/old", model=tiny_model))
    line = error_line(err)
    assert status == 1 and message in line and "run the same command with --resume added" in line
    assert snapshot(old) == before and (staging_path(old) / "checkpoints").is_dir()
    shutil.rmtree(staging_path(old))
    before = snapshot(work)
    for fmt in ("diffusers", "kohya"):
        with monkeypatch.context() as patch:
            patch.setattr(io, "save_file", safetensors_fails(code))
            status, err = run_main(["export", "runs/old", "--format", fmt, "--out", "exported", "--no-preview"])
        assert status == 1 and message in error_line(err), fmt
        assert snapshot(work) == before


def out_dir_a_file(d, monkeypatch):
    (d / "afile").write_text("mine")
    monkeypatch.setattr("bas.generation.generate.load_run_pipeline", lambda *a, **k: pytest.fail("sampled before checking --out-dir"))
    return GENERATE + ["--out-dir", "afile"]


def edit_out_dir_below_a_file(d, monkeypatch):
    (d / "afile").write_text("mine")
    monkeypatch.setattr("bas.generation.generate.load_run_pipeline", lambda *a, **k: pytest.fail("sampled before checking --out-dir"))
    return ["edit", "runs/old", "a photo of <asset0>", "--image", "scene/img.png", "--mask", "scene/mask0.png", "--steps", "1", "--out-dir", "afile/edits"]


def memory_runs_out(d, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr("bas.generation.generate.sampling_seeds", exhausted)
    return GENERATE


def pickled_model(d, monkeypatch):
    """run.json's base model with pickled weights that would run code: on export's preview path, which loads it."""
    import pickle

    model = shutil.copytree(Path(json.loads((d / "runs" / "old" / "run.json").read_text())["model"]), d / "model")
    (model / "text_encoder" / "model.safetensors").unlink()

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    (model / "text_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode()))
    rewrite_json(d / "runs" / "old", lambda info: info.update(model=str(model)))
    return EXPORT + ["--preview-steps", "1"]


def another_family(d, monkeypatch):
    """run.json names SDXL (and an SDXL model) while its LoRA and handles are SD's."""
    from bas.demo.tiny import save_tiny_model
    from bas.plugins.sdxl import StableDiffusionXL

    model = save_tiny_model(d / "sdxl", seed=0, family=StableDiffusionXL())
    rewrite_json(d / "runs" / "old", lambda info: info.update(model=str(model), family="sdxl"))
    return GENERATE


def installed_plugin_raises(d, monkeypatch):
    """An installed plugin whose observer fails in its own code, as a bug in a plugin does."""
    import textwrap
    import types

    from bas.core import plugins as plugins_module

    module = types.ModuleType("boom_pkg")  # the plugin's code lives in its own package, as an installed one's does
    exec(textwrap.dedent('''
        import bas

        class Boom:
            def on_phase_start(self, run, phase):
                raise RuntimeError("kaboom")

        @bas.hookimpl
        def bas_register_observers(register):
            register("boom", lambda config: Boom())
    '''), module.__dict__)
    monkeypatch.setitem(sys.modules, "boom_pkg", module)
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: {"boom": FakeEntryPoint("boom", lambda: module)})
    return run_args("--plugin", "boom", out="runs/new")


BOUNDARY = [  # (case, prepare -> arguments, message)
    ("generate --out-dir is a file, before sampling", out_dir_a_file, "--out-dir afile is a file; pass a folder path"),
    ("edit --out-dir below a file, before sampling", edit_out_dir_below_a_file, "--out-dir afile/edits is below afile, which is a file"),
    ("out of memory", memory_runs_out, "Out of memory (MemoryError); ask for less at once (fewer --num-images"),
    ("pickled model weights on export's preview path", pickled_model, "holds a weights file that cannot be read safely (pickled weights that could run code)"),
    ("run.json names another family than its weights", another_family, "lora weights do not fit the sdxl model"),
    ("an installed plugin's code raises", installed_plugin_raises,
     "Plugin 'boom' raised in Boom.on_phase_start: RuntimeError: kaboom (a fault of the plugin: report it to its authors, and run without --plugin boom"),
]


@pytest.mark.parametrize("case, prepare, message", BOUNDARY, ids=[c[0] for c in BOUNDARY])
def test_known_failures_are_one_error_line_and_exit_1(case, prepare, message, work, tiny_model, monkeypatch):
    args = prepare(work, monkeypatch)
    before = snapshot(work)
    code, err = run_main([str(tiny_model) if a is None else a for a in args])
    assert code == 1 and message in error_line(err)
    assert snapshot(work) == before and not (work / "exported").exists() and not (work / "pwned").exists()


@pytest.mark.parametrize("damage", [
    lambda t: t.__setitem__("trainable", {k: v[:1] for k, v in t["trainable"].items()}),  # other shapes (torch would broadcast them in)
    lambda t: t["optimizer"]["optimizer"]["param_groups"].append(dict(t["optimizer"]["optimizer"]["param_groups"][0], params=[999])),
    lambda t: t.__setitem__("rng", dict(t["rng"], generator=torch.zeros(3, dtype=torch.uint8))),
], ids=["shapes", "optimizer groups", "rng state"])
def test_resume_from_a_checkpoint_that_does_not_fit_is_one_error(damage, work, tiny_model):
    out = work / "runs" / "new"
    with pytest.raises(NumericalError):
        run_fragile(work, work / "scene", tiny_model, out)
    saved = staging_path(out) / "checkpoints" / "phase1-step00002"
    parts = {"trainable": load_file(str(saved / "trainable.safetensors")), "rng": load_file(str(saved / "rng.safetensors")),
             "optimizer": torch.load(saved / "optimizer.pt", weights_only=True)}
    damage(parts)
    save_file(parts["trainable"], str(saved / "trainable.safetensors"))
    save_file(parts["rng"], str(saved / "rng.safetensors"))
    torch.save(parts["optimizer"], saved / "optimizer.pt")
    before = snapshot(work)
    with pytest.raises(BasError, match="phase1-step00002 does not fit this run .*; it is damaged or from other options: start over with --overwrite"):
        run_fragile(work, work / "scene", tiny_model, out, resume=True)
    assert snapshot(work) == before


def test_too_many_images_are_refused_before_any_list_of_seeds_is_made():
    from bas.core.evaluation import EvalConfig
    from bas.generation.generate import sampling_seeds

    with pytest.raises(BasError, match="--num-images must be at most 10000, not 10001"):
        sampling_seeds(0, None, 10_001)
    with pytest.raises(BasError, match="--num-images must be at most 10000, not 1000000000"):
        EvalConfig(runs=[Path("r")], out=Path("e"), num_images=10**9).check()


def test_images_too_large_or_damaged_are_one_line_in_bas_eval(tmp_path, monkeypatch):
    from bas.core.evaluation import Sample
    from bas.core.failures import known_failure
    from bas.core.run_inputs import load_inputs

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BasError, match="big.png has more than 1,000 pixels, PIL's limit against decompression bombs"):
        Sample("run", "a photo of <asset0>", (0,), 0, None, tmp_path / "big.png").image()
    run = tmp_path / "run"
    (run / "inputs").mkdir(parents=True)
    for name in ("image.png", "mask0.png"):
        shutil.copy(tmp_path / "big.png", run / "inputs" / name)
    with pytest.raises(BasError, match="image.png has more than 1,000 pixels"):
        load_inputs(run, 1)
    with pytest.raises(Image.DecompressionBombError) as raised:  # from code of any other path: still one line
        Image.open(tmp_path / "big.png")
    assert "PIL's limit against decompression bombs" in str(known_failure(raised.value))


def test_the_same_failure_exits_with_the_same_code_from_every_command(work):
    """A damaged run: 1 from each reader (eval included); a usage error (an unknown option): 2 from each."""
    out = work / "runs" / "old"
    other_handles(out)
    readers = READERS + [["eval", "{out}", "--out", "{work}/evaluated", "--num-images", "1", "--steps", "1"]]
    for reader in readers:
        code, err = run_main([a.format(out=out, work=work) for a in reader])
        assert code == 1 and "is damaged or mixed" in error_line(err), reader[0]
        code, err = run_main([a.format(out=out, work=work) for a in reader] + ["--no-such-option"])
        assert code == 2 and "No such option '--no-such-option'" in error_line(err), reader[0]


SAMPLE_ARGS = {"generate": ["runs/old", "a photo of <asset0>"], "edit": EDIT[1:], "eval": ["runs/old", "--out", "evaluated"],
               "demo": ["--out", "demo"], "export": ["runs/old", "--out", "exported"], "tiny-model": ["m"], "run": run_args(out="runs/new")[1:]}
SAME_VALUE_FAILURES = [  # (option and value, the commands that take it): refused by click's types in some, by bas's checks in others
    (["--num-images", "0"], ["generate", "edit", "eval"]),
    (["--num-images", "abc"], ["generate", "edit", "eval"]),
    (["--steps", "0"], ["generate", "edit", "eval", "demo"]),
    (["--guidance", "nan"], ["generate", "edit", "eval"]),
    (["--seed", "-1"], ["generate", "edit", "eval", "tiny-model", "run"]),
    (["--preview-steps", "0"], ["export"]),
    (["--lora-rank", "0"], ["run"]),
]


@pytest.mark.parametrize("option, commands", SAME_VALUE_FAILURES, ids=[" ".join(o) for o, _ in SAME_VALUE_FAILURES])
def test_a_refused_option_value_exits_1_from_every_command_and_an_unreadable_command_line_2(option, commands, work):
    """The same refused value is one Error line and exit 1 whichever command takes it and whoever
    checks it (click's types and ranges, or bas); a command line that cannot be read exits 2."""
    for command in commands:
        args = [command, *SAMPLE_ARGS[command]]
        before = snapshot(work)
        code, err = run_main(args + option)
        assert code == 1 and option[0] in error_line(err), (command, err)
        assert snapshot(work) == before
        code, err = run_main(args + option + ["--no-such-option"] if command != "eval" else [command, "--out", "e"])
        assert code == 2 and ("No such option" in error_line(err) or "Missing argument" in error_line(err)), (command, err)


@pytest.mark.parametrize("prepare, message", [
    (lambda d: (d / "m").write_text("mine"), "DIRECTORY m is a file; pass a folder path"),
    (lambda d: write_not_a_run(d) or (d / "m").symlink_to(d / "runs" / "mine"), "DIRECTORY m is a link"),
    (lambda d: (d / "m").mkdir() or (d / "m" / "thesis.tex").write_text("years"), "holds files and is not a model folder (it has no model_index.json)"),
    (lambda d: shutil.copytree(d / "runs" / "old", d / "m"), "holds files and is not a model folder"),
    (lambda d: (d / "m").mkdir() or (d / "m" / "model_index.json").write_text("{}"), "already holds a model; pass --overwrite to replace it"),
    (lambda d: None, "DIRECTORY . is the current folder"),
], ids=["a file", "a link", "a folder of files", "a run", "a model without --overwrite", "the current folder"])
def test_tiny_model_never_replaces_what_it_did_not_write(prepare, message, work):
    prepare(work)
    before = snapshot(work)
    target = "." if "current folder" in message else "m"
    for extra in ([], ["--overwrite"]) if "--overwrite" not in message else ([],):
        code, err = run_main(["tiny-model", target, *extra])
        assert code == 1 and message in error_line(err)
        assert snapshot(work) == before


def test_tiny_model_replaces_its_own_model_with_overwrite(work):
    code, err = run_main(["tiny-model", "m"])
    assert code == 0, err
    first = snapshot(work / "m")
    code, err = run_main(["tiny-model", "m", "--seed", "1", "--overwrite"])
    assert code == 0 and snapshot(work / "m") != first and (work / "m" / "model_index.json").is_file()


def test_demo_never_replaces_what_it_did_not_write(work):
    write_not_a_run(work)
    (work / "demo").mkdir()
    (work / "demo" / "notes.txt").write_text("mine")
    (work / "demo2").mkdir()
    shutil.copytree(work / "runs" / "old", work / "demo2" / "scene")  # a folder the demo writes, holding what it does not
    before = snapshot(work)
    for out, message in (("demo", "--out demo holds notes.txt, which the demo does not write"), ("demo2", "--out demo2 holds scene/README.md and"),
                         ("runs/mine/thesis.tex", "is a file")):
        code, err = run_main(["demo", "--out", out, "--steps", "1"])
        assert code == 1 and message in error_line(err), out
        assert snapshot(work) == before


def test_an_output_file_path_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    from bas.core import io
    from bas.core.errors import BasError

    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BasError, match=rf"^--out {re.escape(str(tmp_path / 'folder'))} is a folder; pass the path of the file to write\.$"):
        io.check_output_file(tmp_path / "folder", "--out")
    below = tmp_path / "afile" / "sub" / "r.json"
    with pytest.raises(BasError, match=rf"^The folder of --out {re.escape(str(below.parent))} is below {re.escape(str(tmp_path / 'afile'))}, which is a file"):
        io.check_output_file(below, "--out")
    assert io.check_output_file(tmp_path / "new" / "r.json", "--out") == tmp_path / "new" / "r.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"] and (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("links", [True, False])
def test_create_json_writes_once_and_the_second_writer_is_refused_with_nothing_left_behind(tmp_path, monkeypatch, links):
    """io.create_json: whole or nothing, and never over a file already there (a hard link, or where a filesystem has
    none, an exclusive create filled by a rename)."""
    from bas.core import io

    if not links:
        def no_links(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "point.json"
    io.create_json(path, {"chosen": 1})
    with pytest.raises(FileExistsError):
        io.create_json(path, {"chosen": 2})
    assert json.loads(path.read_text()) == {"chosen": 1} and [p.name for p in tmp_path.iterdir()] == ["point.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~io.current_umask()
