"""Output paths every command refuses in one line before it writes: a folder below a file (export, masks,
tiny-model, demo, run, batch, ui), a port out of range; and what `bas batch` makes of a damaged
finished run and of its own damaged summary files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bas.batches.command import report
from bas.batches.runner import Batch
from bas.cli import cli

STEPS = ["--phase1-steps", "1", "--phase2-steps", "1"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` with a file's bytes (``None`` for a folder)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(folder).rglob("*"))}


def one_error(result, start: str, fix: str) -> None:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("Error: " + start) and lines[0].endswith(fix), result.output


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, scene) -> Path:
    """A finished tiny run, as `bas batch` makes scene 'a' of a manifest naming ``scene``."""
    out = tmp_path_factory.mktemp("finished") / "a"
    result = invoke("run", "--scene", scene, "--model", tiny_model, "--out", out, *STEPS, "--quiet")
    assert result.exit_code == 0, result.output
    return out


# -- a path below a file -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["export", "masks", "tiny-model", "demo", "run", "batch", "ui"])
def test_an_output_folder_below_a_file_is_one_line_and_nothing_is_written(command, finished, scene, tiny_model, tmp_path):
    (tmp_path / "afile").write_text("mine")
    below = tmp_path / "afile" / "x"
    args = {
        "export": ["export", finished, "--out", below, "--no-preview"],
        "masks": ["masks", "--image", scene / "img.png", "--mask", scene / "mask0.png", "--mask", scene / "mask1.png", "--out", below],
        "tiny-model": ["tiny-model", below],
        "demo": ["demo", "--out", below, "--steps", "1"],
        "run": ["run", "--scene", scene, "--model", tiny_model, "--out", below, *STEPS, "--quiet"],
        "batch": ["batch", scene, "--out", below, "--model", tiny_model, *STEPS, "--quiet"],
        "ui": ["ui", "--workspace", below],
    }[command]
    option = {"tiny-model": "DIRECTORY", "ui": "--workspace"}.get(command, "--out")
    before = tree(finished)
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    one_error(result, f"{option} {below} is below {tmp_path / 'afile'}, which is a file; ", "pass a folder path.")
    assert tree(tmp_path) == {"afile": b"mine"} and tree(finished) == before


def test_bas_ui_refuses_a_port_out_of_range_before_making_its_workspace(tmp_path):
    for port in ("99999", "0", "-1"):
        result = invoke("ui", "--workspace", tmp_path / "ws", "--port", port)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output  # a refused value, as bas's own checks
        assert f"Invalid value for '--port': {port} is not in the range 1<=x<=65535." in result.output, result.output
        assert not (tmp_path / "ws").exists()


# -- bas batch over a damaged finished run -----------------------------------------------------------
@pytest.fixture
def batch(finished, scene, tiny_model, tmp_path) -> tuple[Path, list]:
    """``runs/`` holding the finished run as scene 'a', and the `bas batch` arguments that run 'a' into it."""
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(finished, runs / "a")
    manifest = tmp_path / "scenes.jsonl"
    manifest.write_text(json.dumps({"name": "a", "scene": str(scene)}) + "\n")
    return runs, ["batch", manifest, "--out", runs, "--model", tiny_model, *STEPS, "--quiet"]


def test_a_finished_run_with_a_missing_file_is_reported_damaged_not_skipped(batch):
    runs, args = batch
    first = invoke(*args)
    assert first.exit_code == 0 and f"1 scene(s) in {runs}: 1 skipped." in first.output, first.output  # the intact run
    (runs / "a" / "handles.safetensors").unlink()
    before = tree(runs / "a")
    result = invoke(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"1 scene(s) in {runs}: 1 damaged." in result.output, result.output
    line = (
        f"  a (damaged): {runs / 'a'} holds a damaged finished run ({runs / 'a'} is incomplete: handles.safetensors, which its run.json "
        "lists, is missing); restore its files, or delete the folder or pass --overwrite to run the scene again."
    )
    assert line in result.output.splitlines(), result.output
    assert tree(runs / "a") == before  # left as it was
    scene = json.loads((runs / "batch.json").read_text())["scenes"][0]
    assert scene["status"] == "damaged" and scene["error"] == line.split(": ", 1)[1]


def test_a_damaged_finished_run_is_run_again_with_overwrite_and_the_summary_says_why(batch, tiny_model, capsys):
    runs, args = batch
    (runs / "a" / "handles.safetensors").unlink()
    damaged = Batch(
        [runs.parent / "scenes.jsonl"], runs, "local", [], True, 1, True, {"model": str(tiny_model), "phase1_steps": 1, "phase2_steps": 1}
    )
    state = damaged.states[0]
    assert state.task is not None and state.task.overwrite is True and state.record["status"] == "pending"
    assert (
        state.record["replaced"]
        == f"its earlier run was damaged ({runs / 'a'} is incomplete: handles.safetensors, which its run.json lists, is missing)"
    )
    report({"out": str(runs), "counts": {"done": 1}, "scenes": [dict(state.record, status="done")]})
    assert capsys.readouterr().out.splitlines()[1] == f"  a (done): run again (--overwrite), as {state.record['replaced']}."
    intact = Batch([runs.parent / "scenes.jsonl"], runs.parent / "other", "local", [], True, 1, True, {"model": str(tiny_model)})
    assert "replaced" not in intact.states[0].record


@pytest.mark.parametrize(("field", "value", "status"), [("times", "x", "skipped"), ("device", 5, "skipped"), ("files", 5, "damaged")])
def test_odd_values_in_a_finished_runs_record_are_one_line_never_a_traceback(field, value, status, batch):
    runs, args = batch
    info = json.loads((runs / "a" / "run.json").read_text())
    (runs / "a" / "run.json").write_text(json.dumps(dict(info, **{field: value})))
    result = invoke(*args)  # no batch.json: the skipped scene's record comes from its run.json
    assert result.exit_code == (0 if status == "skipped" else 1) and "Traceback" not in result.output, result.output
    assert f"1 scene(s) in {runs}: 1 {status}." in result.output, result.output
    if status == "damaged":
        assert f"a (damaged): {runs / 'a'} holds a damaged finished run ({runs / 'a' / 'run.json'} has no valid 'files'); " in result.output


# -- the batch's own files, damaged ------------------------------------------------------------------
def test_a_truncated_batch_json_says_how_to_recover_and_the_batch_rebuilds_it(batch):
    runs, args = batch
    assert invoke(*args).exit_code == 0
    text = (runs / "batch.json").read_text()
    (runs / "batch.json").write_text(text[: len(text) // 2])
    before = tree(runs)
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    one_error(
        result,
        f"--out {runs} holds a damaged batch.json of an earlier bas batch (it cannot be read as JSON: ",
        "delete it and run the batch again, which rebuilds batch.json from the scenes' runs.",
    )
    assert tree(runs) == before
    (runs / "batch.json").unlink()  # as the message says; index.html stays: it is the batch's own
    result = invoke(*args)
    assert result.exit_code == 0 and f"1 scene(s) in {runs}: 1 skipped." in result.output, result.output
    assert json.loads((runs / "batch.json").read_text())["scenes"][0]["status"] == "skipped"


def test_an_empty_batch_json_beside_the_batchs_pictures_is_the_batchs_and_a_users_json_is_not(batch):
    runs, args = batch
    assert invoke(*args).exit_code == 0 and (runs / ".batch").is_dir()
    (runs / "batch.json").write_text("")
    one_error(invoke(*args), f"--out {runs} holds a damaged batch.json of an earlier bas batch (", "rebuilds batch.json from the scenes' runs.")
    (runs / "batch.json").write_text('{"mine": true}')
    before = tree(runs)
    result = invoke(*args)
    assert result.exit_code == 1
    one_error(
        result,
        f"--out {runs} holds batch.json, which is not an earlier bas batch's (it holds no list of scenes), ",
        "choose another --out (or, if a bas batch wrote it, delete it: the batch rebuilds it from the scenes' runs).",
    )
    assert tree(runs) == before
