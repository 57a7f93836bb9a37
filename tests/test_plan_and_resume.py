"""`bas run --plan` with plugins that read values or write files, and `--resume` from a checkpoint that
was hand-edited or is resumed without the model's recommended settings: a plan, or one line naming the fix."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import types
from pathlib import Path

import pytest

from bas.core import plugins as plugins_module
from bas.core.runfolder import staging_path
from conftest import run_main, snapshot  # noqa: E402


def error_line(err: str) -> str:
    """The one line a failed command prints (warnings and the model's settings aside); asserts there is exactly one."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Warning: ", "Using bas-mini's recommended"))]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err
    return lines[0]


class FakeEntryPoint:
    def __init__(self, name, load):
        self.name, self.value, self.dist, self._load = name, f"{name}_pkg", None, load

    def load(self):
        return self._load()


def install_plugin(monkeypatch, name: str, code: str) -> None:
    """An installed plugin ``name`` whose code lives in its own package, ``NAME_pkg``."""
    module = types.ModuleType(f"{name}_pkg")
    exec(textwrap.dedent(code), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    entry_points = plugins_module._entry_points()
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: {**entry_points, name: FakeEntryPoint(name, lambda: module)})


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- the plan: value checks, class images --------------------------------------------------------
@pytest.mark.parametrize(
    "args, concepts",
    [
        (["--background"], 3),  # the masks' complement is checked (a stand-in scene's, or the given masks')
        (["--background", "--scene", None], 3),
        (["--plugin", "attention-contrast"], 2),  # its loss picks the pixels one mask owns
        (["--plugin", "attention-contrast", "--background", "--device", "cuda"], 3),
        (["--plugin", "background-anchor", "--background"], 3),  # every opt-in built-in loss term plans
    ],
    ids=["background", "background of a scene", "attention-contrast", "both, for cuda", "background-anchor"],
)
def test_a_plan_reads_no_tensor_values(args, concepts, here, scene, capsys):
    args = [str(scene) if a is None else a for a in args]
    code, out, err = run_main(["run", "--model", "bas-mini", "--plan", "--json", "--device", "cpu", *args], capsys)
    assert code == 0 and "Traceback" not in err, err
    plan = json.loads(out)
    assert plan["concepts"] == concepts and plan["peak"] > 0 and plan["assumptions"] == []
    assert list(here.iterdir()) == []  # a plan writes nothing


def test_a_plan_with_prior_preservation_generates_nothing_and_says_what_it_assumed(here, capsys):
    common = ["run", "--model", "bas-mini", "--plan", "--device", "cpu", "--phase1-steps", "1", "--phase2-steps", "1"]
    code, out, err = run_main([*common, "--json"], capsys)
    assert code == 0, err
    without = json.loads(out)
    prior = [*common, "--plugin", "prior-preservation", "--num-class-images", "20", "--class-data-dir", "classes"]
    code, out, err = run_main([*prior, "--json"], capsys)
    assert code == 0 and "Traceback" not in err, err
    plan = json.loads(out)
    assert plan["assumptions"] == [
        "prior preservation trains on 20 class images at 64 px, their latents cached; generating the missing ones "
        "(with the pipeline, before training) is not planned."
    ]
    # training with the class batch: phase 2 runs one more forward and backward pass; loading encodes the class images
    assert plan["phases"]["phase2"]["activations"] > 1.5 * without["phases"]["phase2"]["activations"]
    assert plan["phases"]["phase1"]["activations"] == without["phases"]["phase1"]["activations"]  # a phase-2 term only
    assert plan["phases"]["load"]["peak"] > without["phases"]["load"]["peak"]
    code, out, err = run_main(prior, capsys)
    assert code == 0 and "  Assumed: prior preservation trains on 20 class images at 64 px" in out
    assert list(here.iterdir()) == []  # no class image generated, no folder made


PEEKING = """
    import bas
    from bas.core.components import LossTerm

    class Peek(LossTerm):
        name = "peek"
        weight = 1.0

        def __init__(self, config):
            pass

        def setup(self, run):
            if not (run.masks > 0.5).any():  # a check of the masks' values
                raise ValueError("no mask")

        def __call__(self, batch):
            return batch.model_pred.float().pow(2).mean()

    @bas.hookimpl
    def bas_register_loss_terms(register):
        register("peek", Peek)
"""


def test_a_plugin_that_reads_values_in_a_plan_is_named_in_one_line(here, monkeypatch, capsys):
    install_plugin(monkeypatch, "peek", PEEKING)
    code, out, err = run_main(["run", "--model", "bas-mini", "--plan", "--device", "cpu", "--plugin", "peek"], capsys)
    assert code == 1 and out == ""
    assert error_line(err) == (
        "Error: Plugin 'peek' reads a tensor's values in Peek.setup, which a memory plan cannot (it computes shapes, not values), "
        "so the run's memory with it cannot be predicted; plan without --plugin peek to leave it out, and ask its authors to skip "
        "such checks where run.planning is true."
    )
    assert list(here.iterdir()) == []
    # what the message asks of the plugin: with the check skipped in a plan, the plan goes through
    install_plugin(monkeypatch, "peek", PEEKING.replace("if not (run.masks", "if not run.planning and not (run.masks"))
    code, out, err = run_main(["run", "--model", "bas-mini", "--plan", "--device", "cpu", "--plugin", "peek"], capsys)
    assert code == 0 and "Predicted peak" in out, err


# -- resume: a hand-edited checkpoint, and the model's settings left out ----------------------------
STOPPER = """
    import bas

    class Stop:
        def on_step(self, run, record):
            if (record.phase, record.step) == (1, 2):
                run.request_stop()  # as Ctrl-C does: the state after step 2 is saved

    @bas.hookimpl
    def bas_register_observers(register):
        register("stopper", lambda config: Stop())
"""


def run_args(scene, *extra):
    return ["run", "--model", "bas-mini", "--scene", scene, "--out", "intr", "--phase1-steps", "4", "--phase2-steps", "1",
            "--quiet", "--plugin", "stopper", *extra]  # fmt: skip


@pytest.fixture
def interrupted(here, scene, monkeypatch, capsys) -> Path:
    """A bas-mini run with the model's recommended settings, stopped after phase 1 step 2."""
    install_plugin(monkeypatch, "stopper", STOPPER)
    code, out, err = run_main(run_args(scene), capsys)
    assert code != 0 and "Interrupted at phase 1 step 2" in err, err
    state = staging_path(here / "intr") / "checkpoints" / "phase1-step00002" / "state.json"
    assert state.is_file()
    return state


@pytest.mark.parametrize(
    "history, problem",
    [
        ({}, "state.json has no valid 'history' of phase1 (a list of each step's losses)"),
        ({"phase1": "x", "phase2": []}, "state.json has no valid 'history' of phase1 (a list of each step's losses)"),
        ({"phase1": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]}, "state.json has no valid 'history' of phase2"),
        ({"phase1": [{"step": 1, "loss": "low"}], "phase2": []}, "state.json has no valid 'history' of phase1"),
        ({"phase1": [None], "phase2": []}, "state.json has no valid 'history' of phase1"),
    ],
    ids=["empty", "not a list", "no phase2", "a loss not a number", "a step not an object"],
)
def test_a_hand_edited_history_is_a_damaged_checkpoint_in_one_line(history, problem, interrupted, here, scene, capsys):
    state = json.loads(interrupted.read_text())
    state["history"] = history
    interrupted.write_text(json.dumps(state))
    before = snapshot(here)
    code, out, err = run_main(run_args(scene, "--resume"), capsys)
    line = error_line(err)
    assert code == 1
    assert line.startswith(f"Error: Checkpoint {interrupted.parent} cannot be read ({problem}")
    assert line.endswith("; start over with --overwrite instead of --resume.")
    assert snapshot(here) == before


def test_a_hand_edited_times_is_a_damaged_checkpoint_in_one_line(interrupted, here, scene, capsys):
    state = json.loads(interrupted.read_text())
    state["times"] = {"phase1_s": "long"}
    interrupted.write_text(json.dumps(state))
    before = snapshot(here)
    code, out, err = run_main(run_args(scene, "--resume"), capsys)
    assert code == 1 and "cannot be read (state.json has no valid 'times'); start over with --overwrite" in error_line(err)
    assert snapshot(here) == before


def test_resuming_without_the_models_settings_says_where_each_value_came_from(interrupted, here, scene, capsys):
    before = snapshot(here)
    code, out, err = run_main(run_args(scene, "--resume", "--no-model-defaults"), capsys)
    assert code == 1
    assert error_line(err) == (
        "Error: The checkpoint was made with attention_loss_weight=0.1 from bas-mini's recommended settings, but this command "
        "has bas's default 0.01 because --no-model-defaults leaves those settings out; resume without --no-model-defaults, "
        "as the interrupted run was started."
    )
    assert snapshot(here) == before
    # a value the user gives is the user's, not bas's default
    code, out, err = run_main(run_args(scene, "--resume", "--attention-loss-weight", "0.2"), capsys)
    assert code == 1
    assert error_line(err) == (
        "Error: The checkpoint was made with attention_loss_weight=0.1 from bas-mini's recommended settings, but this command "
        "gives 0.2; resume with the interrupted run's attention_loss_weight=0.1, or use --overwrite to start over with yours."
    )
    assert snapshot(here) == before
    # the fix the message names: the run goes on from its checkpoint and finishes
    code, out, err = run_main(run_args(scene, "--resume"), capsys)
    assert code == 0, err
    info = json.loads((here / "intr" / "run.json").read_text())
    assert info["resumed"] and [s["step"] for s in info["history"]["phase1"]] == [1, 2, 3, 4]
    assert not staging_path(here / "intr").exists()
    shutil.rmtree(here / "intr")
