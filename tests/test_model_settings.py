"""A model's recommended run settings (``bas_model_settings``): bas-mini runs at its operating point where
the user gives no value, whatever the way the run starts, and an option the user gives always wins."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import bas
from bas.batches.runner import Batch
from bas.core.api import make_config
from bas.core.errors import BasError
from bas.core.plugins import Plugins
from bas.mini import RECOMMENDED
from bas.ui import commands
from bas.ui.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"phase1_steps": 400, "phase2_steps": 400, "phase1_lr": 5e-4, "attention_loss_weight": 0.01}  # bas run's own defaults


def settings(config) -> dict:
    return {
        "phase1_steps": config.phase1_steps,
        "phase2_steps": config.phase2_steps,
        "phase1_lr": config.phase1_lr,
        "attention_loss_weight": config.options.get("attention_loss_weight"),
    }


def test_bas_minis_recommended_settings_are_the_operating_point_the_benchmark_chose():
    point = json.loads((ROOT / "benchmarks" / "operating-point.json").read_text())["settings"]
    chosen = {"phase1_steps": point["steps"][0], "phase2_steps": point["steps"][1], **point["learning_rates"], **point["options"]}
    assert RECOMMENDED == chosen
    assert point["attention_res"] is None  # the 16x16 maps, bas run's default side: nothing to recommend


def test_bas_run_on_bas_mini_takes_its_settings_where_none_is_given_and_says_so(invoke, scene, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "run", "--scene", scene, "--model", "bas-mini", "--out", out, "--phase1-steps", 2, "--phase2-steps", 1, "--device", "cpu", "--quiet"
    )
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "recommended settings" in line]
    assert said == [
        "Using bas-mini's recommended settings for the options you left out: --phase1-lr 0.002 --attention-loss-weight 0.1 "
        "(give an option to choose its value, or --no-model-defaults for bas's own defaults)."
    ]
    info = json.loads((out / "run.json").read_text())
    assert info["model_settings"] == {"phase1_lr": 2e-3, "attention_loss_weight": 0.1}  # the steps were given
    assert info["learning_rates"]["phase1"] == 2e-3 and info["config"]["phase1_steps"] == 2 and info["config"]["phase2_steps"] == 1
    assert {t["name"]: t["weight"] for t in info["loss_terms"]}["attention"] == 0.1
    assert info["history"]["phase1"] and len(info["history"]["phase1"]) == 2  # the user's steps, not the model's 200


@pytest.mark.parametrize(
    "extra, took",
    [
        ([], "--phase1-steps 200 --phase2-steps 200 --phase1-lr 0.002 --attention-loss-weight 0.1"),
        (["--phase1-lr", "5e-4"], "--phase1-steps 200 --phase2-steps 200 --attention-loss-weight 0.1"),  # given, though it is bas's default
        (["--phase1-steps", "400", "-p", "no:attention-loss"], "--phase2-steps 200 --phase1-lr 0.002"),  # a plugin that is off: skipped
        (["--no-model-defaults"], None),
    ],
)
def test_an_option_the_user_gives_always_wins(extra, took, invoke, scene, tmp_path):
    result = invoke("run", "--plan", "--scene", scene, "--model", "bas-mini", "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output
    said = re.findall(r"recommended settings for the options you left out: (.*) \(give", result.stderr)
    assert said == ([took] if took else [])


def test_the_python_api_and_bas_batch_take_them_as_bas_run_does(scene, tiny_model, tmp_path):
    pm = Plugins()
    base = {"scene": scene, "model": "bas-mini", "out": tmp_path / "out"}
    assert settings(make_config(pm, base, [])) == RECOMMENDED
    config = make_config(pm, {**base, "phase1_lr": 1e-3, "phase2_steps": 5}, [])  # bas.extract's keywords are the given options
    assert settings(config) == {**RECOMMENDED, "phase1_lr": 1e-3, "phase2_steps": 5}
    assert config.model_settings == {"phase1_steps": 200, "attention_loss_weight": 0.1}
    assert settings(make_config(pm, {**base, "model_defaults": False}, [])) == PAPER
    assert settings(make_config(pm, {**base, "model": str(tiny_model)}, [])) == PAPER  # a model no plugin recommends settings for
    assert settings(make_config(pm, {**base, "model": None}, [])) == PAPER  # the default model, SD 2.1 base: the paper's are its own

    lines = [
        {"name": "mini", "scene": str(scene), "model": "bas-mini"},
        {"name": "given", "scene": str(scene), "model": "bas-mini", "phase1_lr": 1e-3},
        {"name": "tiny", "scene": str(scene), "model": str(tiny_model)},
    ]
    batch = Batch(lines, tmp_path / "runs", "local", [], False, 1, True, {"phase2_steps": 7})
    # a scene's worker makes its config from the task as bas.extract does
    made = {s.spec.name: make_config(batch.manager, dict(s.task.values, out=Path(s.task.out)), s.task.plugins) for s in batch.states}
    assert settings(made["mini"]) == {**RECOMMENDED, "phase2_steps": 7}
    assert settings(made["given"]) == {**RECOMMENDED, "phase1_lr": 1e-3, "phase2_steps": 7}
    assert settings(made["tiny"]) == {**PAPER, "phase2_steps": 7}


def test_a_finished_run_from_before_model_settings_is_the_same_run_to_batch_and_resume(scene, tmp_path):
    """A run.json or checkpoint written before model settings existed lacks their keys; with the same values
    it is the same run (the values are compared, not where they came from)."""
    from bas.batches.runner import option_differences
    from bas.core.checkpoint import check_same_run

    config = make_config(Plugins(), {"scene": scene, "model": "bas-mini", "out": tmp_path / "out"}, []).to_json()
    assert config["model_settings"] and config["model_defaults"] is True
    old = {k: v for k, v in config.items() if k not in ("model_settings", "model_defaults")}
    assert option_differences(old, config) == []
    check_same_run(json.loads(json.dumps(old, default=str)), config)
    # a bas-mini run started at the paper's rate, before bas-mini had settings of its own: the way to resume it
    started = json.loads(json.dumps(dict(old, phase1_lr=5e-4), default=str))
    with pytest.raises(
        BasError,
        match=r"^The checkpoint was made with phase1_lr=0.0005, but this command takes 0.002 from bas-mini's "
        r"recommended settings; resume with --no-model-defaults \(or with the interrupted run's options\)\.$",
    ):
        check_same_run(started, config)
    check_same_run(
        started,
        make_config(
            Plugins(),
            {
                "scene": scene,
                "model": "bas-mini",
                "out": tmp_path / "out",
                "model_defaults": False,
                "phase1_steps": 200,
                "phase2_steps": 200,
                "attention_loss_weight": 0.1,
            },
            [],
        ).to_json(),
    )
    with pytest.raises(BasError, match=r"made with seed=0 but this command has 1; resume with the same options"):
        check_same_run(started, dict(config, seed=1, phase1_lr=5e-4))  # a value the user gave: the usual message


def test_the_page_shows_the_models_settings_and_runs_what_it_shows(tmp_path):
    ws = Workspace(tmp_path / "ws")
    d = commands.defaults(model="bas-mini")
    assert {k: d[k] for k in ("phase1_steps", "phase2_steps", "phase1_lr")} == {
        k: RECOMMENDED[k] for k in ("phase1_steps", "phase2_steps", "phase1_lr")
    }
    assert commands.defaults(model="some/model")["phase1_lr"] == 5e-4
    form = {
        "scene": "scenes/toys",
        "out": "runs/toys",
        "model": "bas-mini",
        "weights": "lora",
        "phase1_steps": d["phase1_steps"],
        "phase2_steps": d["phase2_steps"],
        "phase1_lr": d["phase1_lr"],
        "lora_rank": d["lora_rank"],
        "seed": 0,
        "precision": "auto",
        "device": "cpu",
    }
    args = commands.run_args(form, commands.absolute(ws))
    assert "--phase1-lr" not in args and "--phase1-steps" not in args  # as the fields start: the model's, left out
    config, _ = commands.parse_run(args, ws)
    assert settings(config) == RECOMMENDED and config.model_settings == RECOMMENDED
    # a value typed into a field is the user's, even bas's own default; on another model the shown values are given
    config, _ = commands.parse_run(commands.run_args(dict(form, phase1_lr=5e-4), commands.absolute(ws)), ws)
    assert config.phase1_lr == 5e-4 and "phase1_lr" not in config.model_settings
    config, _ = commands.parse_run(commands.run_args(dict(form, model="some/model"), commands.absolute(ws)), ws)
    assert (config.phase1_steps, config.phase1_lr, config.model_settings) == (200, 2e-3, {})
    # the page resumes a run started on the command line with the options that make the same config
    for given in ({}, {"phase1_lr": 5e-4}, {"model_defaults": False}):
        ran = make_config(Plugins(), {"scene": ws.root / "scenes" / "a", "model": "bas-mini", "out": ws.root / "runs" / "a", **given}, [])
        again, _ = commands.parse_run(commands.config_args(json.loads(json.dumps(ran.to_json(), default=str))), ws)
        assert settings(again) == settings(ran) and again.model_defaults == ran.model_defaults


class Recommends:
    """A community plugin recommending settings for its own model name."""

    def __init__(self, answer):
        self.answer = answer

    @bas.hookimpl
    def bas_model_settings(self, name):
        return self.answer if name == "my-model" else None


def test_a_plugin_recommends_settings_for_its_model_and_a_bad_answer_is_one_line(tmp_path):
    pm = Plugins(extra=[("mine", Recommends({"phase1_lr": 1e-2, "lora_rank": 16, "family": "sdxl", "resume": True}))])
    config = make_config(pm, {"model": "my-model", "out": tmp_path / "out"}, [])
    assert config.family is None and config.resume is False  # a model recommends settings, never what the run is or does
    assert config.phase1_lr == 1e-2 and config.options["lora_rank"] == 16 and config.model_settings == {"phase1_lr": 1e-2, "lora_rank": 16}
    assert make_config(pm, {"model": "other", "out": tmp_path / "out"}, []).model_settings == {}
    pm = Plugins(extra=[("mine", Recommends([("phase1_lr", 1e-2)]))])
    with pytest.raises(
        BasError, match=r"^Plugin 'mine' returned \[\('phase1_lr', 0.01\)\] from bas_model_settings; return a dict of option names\.$"
    ):
        make_config(pm, {"model": "my-model", "out": tmp_path / "out"}, [])
    for bad, why in (
        ({"phase1_lr": "fast"}, r"phase1_lr='fast' for my-model, which bas cannot use \(not a float\)"),
        ({"phase1_steps": 2.5}, r"phase1_steps=2.5 for my-model, which bas cannot use \(not a whole number\)"),
        ({"lora_rank": "big"}, r"lora_rank='big' for my-model, which bas cannot use \('big' is not a valid integer"),
        ({"background": "yes"}, r"background='yes' for my-model, which bas cannot use \(not a bool\)"),
    ):
        pm = Plugins(extra=[("mine", Recommends(bad))])
        with pytest.raises(BasError, match=rf"^Plugin 'mine' recommends {why}.*; update the plugin, or pass --no-model-defaults\.$"):
            make_config(pm, {"model": "my-model", "out": tmp_path / "out"}, [])
    pm = Plugins(extra=[("mine", Recommends({"phase1_lr": -1.0, "phase1_steps": 3}))])
    with pytest.raises(
        BasError,
        match=r"^The settings recommended for my-model \(bas_model_settings\) do not pass bas's checks: "
        r"--phase1-lr must be positive, not -1.0\. Update the plugin that recommends them, or pass --no-model-defaults\.$",
    ):
        make_config(pm, {"model": "my-model", "out": tmp_path / "out"}, [])
    config = make_config(pm, {"model": "my-model", "out": tmp_path / "out", "phase1_lr": 1e-3}, [])  # the user's value: nothing to refuse
    assert config.phase1_lr == 1e-3 and config.phase1_steps == 3 and isinstance(config.phase1_steps, int)


# -- a model that recommends a plugin (bas-mini's second operating point has background-anchor) -----------------
WITH_ANCHOR = {**RECOMMENDED, "plugins": ["background-anchor"], "background_anchor_weight": 0.5}


@pytest.fixture
def anchored(monkeypatch):
    """bas-mini recommending background-anchor, as its recommended settings will once operating point 2's table is in."""
    import bas.mini

    monkeypatch.setattr(bas.mini, "RECOMMENDED", WITH_ANCHOR)


@pytest.mark.parametrize(
    "extra, took",
    [
        (
            [],
            "--phase1-steps 200 --phase2-steps 200 --phase1-lr 0.002 --attention-loss-weight 0.1 --background-anchor-weight 0.5 "
            "--plugin background-anchor",
        ),
        (
            ["--background-anchor-weight", "2"],
            "--phase1-steps 200 --phase2-steps 200 --phase1-lr 0.002 --attention-loss-weight 0.1 --plugin background-anchor",
        ),  # the model's plugin's option, given without -p
        (["-p", "no:background-anchor"], "--phase1-steps 200 --phase2-steps 200 --phase1-lr 0.002 --attention-loss-weight 0.1"),
        (["-p", "full"], "--phase1-steps 200 --phase2-steps 200 --phase1-lr 0.002 --attention-loss-weight 0.1"),  # it cannot run there
        (
            ["-p", "background-anchor"],
            "--phase1-steps 200 --phase2-steps 200 --phase1-lr 0.002 --attention-loss-weight 0.1 --background-anchor-weight 0.5",
        ),  # the user's own: not the model's
        (["--no-model-defaults"], None),
    ],
)
def test_a_plugin_the_model_recommends_is_on_unless_the_user_names_it_turns_it_off_or_cannot_run_it(extra, took, anchored, invoke, scene):
    with warnings.catch_warnings(record=True) as caught:  # bas shows a warning as one "Warning: ..." line (bas.core.compat)
        warnings.simplefilter("always")
        result = invoke("run", "--plan", "--scene", scene, "--model", "bas-mini", "--device", "cpu", *extra)
    assert result.exit_code == 0, result.output
    said = re.findall(r"recommended settings for the options you left out: (.*) \(give", result.stderr)
    assert said == ([took] if took else [])
    left_off = (
        "bas-mini recommends --plugin background-anchor, which cannot run with the weight strategy you chose (it needs adapters); "
        "the run goes without it."
    )
    assert (left_off in {str(w.message) for w in caught}) == (extra == ["-p", "full"])  # left off, and said so


def test_a_run_turns_on_the_models_plugin_and_run_json_says_the_model_chose_it(anchored, invoke, scene, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "run", "--scene", scene, "--model", "bas-mini", "--out", out, "--phase1-steps", 1, "--phase2-steps", 1, "--device", "cpu", "--quiet"
    )
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["plugins"] == ["background-anchor"]
    assert info["model_settings"]["plugins"] == ["background-anchor"] and info["model_settings"]["background_anchor_weight"] == 0.5
    assert {t["name"]: t["weight"] for t in info["loss_terms"]}["background-anchor"] == 0.5
    assert "background-anchor" in info["history"]["phase2"][0]  # it trained with it


def test_every_way_to_start_a_run_turns_the_models_plugin_on(anchored, scene, tiny_model, tmp_path):
    from bas.core.api import model_plugins, run_plugins

    base = {"scene": scene, "model": "bas-mini", "out": tmp_path / "out"}
    plain = Plugins()
    with pytest.raises(
        BasError,
        match=r"^The plugin manager lacks background-anchor, which bas-mini recommends; make it with "
        r"bas\.core\.api\.run_plugins\.$",
    ):
        make_config(plain, base, [])  # a caller that forgot the model's plugins is told, not run without them
    manager = run_plugins(plain, base, [])
    assert manager is not plain and "background-anchor" in manager.infos
    assert run_plugins(plain, {**base, "model": "some/model"}, []) is plain  # nothing to turn on: the same manager
    config = make_config(manager, base, [])
    assert config.plugins == ["background-anchor"] and config.model_settings["plugins"] == ["background-anchor"]
    assert config.options["background_anchor_weight"] == 0.5
    assert model_plugins(Plugins(["full"]), base, ["full"]) == []  # the full fine-tune has no base model to ask
    assert model_plugins(plain, {**base, "model_defaults": False}, []) == []
    assert model_plugins(plain, base, ["no:background-anchor"]) == []

    # a run made from a config whose model turned a plugin on refuses a manager without it
    from bas.core.training import Run

    with pytest.raises(BasError, match=r"^The run's plugins lack background-anchor, which bas-mini recommends"):
        Run(config, plain)

    # bas batch: each scene's model decides (the batch's --model bas-mini here); a scene that names full runs without it
    lines = [
        {"name": "mini", "scene": str(scene)},
        {"name": "mini-full", "scene": str(scene), "plugins": ["full"]},
        {"name": "mini-off", "scene": str(scene), "model_defaults": False},
        {"name": "weighted", "scene": str(scene), "background_anchor_weight": 2.0},  # the model's plugin's option
        {"name": "tiny", "scene": str(scene), "model": str(tiny_model)},  # a model that recommends nothing
    ]
    batch = Batch(lines, tmp_path / "runs", "local", [], False, 1, True, {"model": "bas-mini"})
    made = {}
    for s in batch.states:  # a scene's worker makes its manager and config from the task (bas.core.batch.tasks.run_scene)
        values = dict(s.task.values, out=Path(s.task.out))
        made[s.spec.name] = make_config(run_plugins(Plugins(s.task.plugins), values, s.task.plugins), values, s.task.plugins)
    assert made["mini"].plugins == ["background-anchor"] and made["mini"].options["background_anchor_weight"] == 0.5
    assert made["mini-full"].plugins == ["full"] and "plugins" not in made["mini-full"].model_settings
    assert made["mini-off"].plugins == [] and made["mini-off"].model_settings == {} and "background_anchor_weight" not in made["mini-off"].options
    assert made["tiny"].plugins == [] and "background_anchor_weight" not in made["tiny"].options
    assert made["weighted"].options["background_anchor_weight"] == 2.0
    assert "--plugin background-anchor" in batch.states[0].model_settings
    # the same batch again over those runs finished: every scene is the same run, so skipped
    for name, config in made.items():
        from safetensors.torch import save_file  # a finished run as far as the batch checks one (bas.core.runs.read_run)

        (tmp_path / "runs" / name).mkdir(parents=True)
        save_file({"<asset0>": torch.zeros(4)}, str(tmp_path / "runs" / name / "handles.safetensors"))
        (tmp_path / "runs" / name / "run.json").write_text(
            json.dumps(
                {"config": config.to_json(), "model": "m", "handles": ["<asset0>"], "resolution": 64, "files": ["handles.safetensors"]}, default=str
            )
        )
    again = Batch(lines, tmp_path / "runs", "local", [], False, 1, True, {"model": "bas-mini"})
    assert {s.spec.name: (s.record["status"], s.record["error"]) for s in again.states} == {n: ("skipped", None) for n in made}
    # and the worker itself runs with it
    from bas.core.batch.tasks import run_scene

    quick = Batch(
        lines[:1], tmp_path / "quick", "local", [], False, 1, True, {"model": "bas-mini", "phase1_steps": 1, "phase2_steps": 1, "device": "cpu"}
    )
    result = run_scene(quick.states[0].task, lambda event: None)
    assert result["status"] == "done", result["error"]
    info = json.loads((tmp_path / "quick" / "mini" / "run.json").read_text())
    assert info["config"]["plugins"] == ["background-anchor"] and info["model_settings"]["plugins"] == ["background-anchor"]
    assert "background-anchor" in info["history"]["phase2"][0]


def test_the_pages_fields_follow_the_model_typed_where_the_user_left_them(anchored):
    """Naming another model on the page: each field still at the last model's recommendation takes the new one's, what
    the user typed stays, and the plugin ticks follow (none that needs adapters for the full fine-tune)."""
    sd = commands.defaults(model="some/model")
    fields = {k: sd[k] for k in commands.FOLLOWS_MODEL}
    values, ticked = commands.follow_model("some/model", "bas-mini", fields, ["tensorboard"], "lora")
    assert values == {**fields, "phase1_steps": 200, "phase2_steps": 200, "phase1_lr": 2e-3} and ticked == ["tensorboard", "background-anchor"]
    assert (sd["phase1_steps"], sd["phase1_lr"]) != (200, 2e-3)  # each field above did change
    typed = {**fields, "phase2_steps": 7, "seed": 3}  # the user's own values stay
    assert commands.follow_model("some/model", "bas-mini", typed, [], "lora")[0] == {**typed, "phase1_steps": 200, "phase1_lr": 2e-3}
    assert commands.follow_model("some/model", "bas-mini", fields, ["tensorboard"], "full")[1] == ["tensorboard"]
    # and back: bas-mini's values and its plugin go, the user's tick and values stay
    mini = {**fields, "phase1_steps": 200, "phase2_steps": 200, "phase1_lr": 0.002}
    back, ticked = commands.follow_model("bas-mini", "some/model", {**mini, "phase2_steps": 9}, ["background-anchor", "tensorboard"], "lora")
    assert back == {**fields, "phase2_steps": 9} and ticked == ["tensorboard"]
    # the page's own number types (an int field sent back as a float) compare as numbers
    assert commands.follow_model("bas-mini", "some/model", {**mini, "phase1_steps": 200.0}, [], "lora")[0]["phase1_steps"] == sd["phase1_steps"]


def test_the_page_ticks_the_models_plugin_and_runs_what_it_shows(anchored, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    d = commands.defaults(model="bas-mini")
    assert d["plugins"] == ["background-anchor"] and d["background_anchor_weight"] == 0.5
    assert commands.defaults(["full"], model="bas-mini")["plugins"] == []
    form = {
        "scene": "scenes/toys",
        "out": "runs/toys",
        "model": "bas-mini",
        "weights": "lora",
        "plugins": ["background-anchor"],
        "seed": 0,
        "precision": "auto",
        "device": "cpu",
    }
    args = commands.run_args(form, commands.absolute(ws))
    assert "background-anchor" not in " ".join(args)  # ticked as it starts: the model's, left out
    config, names = commands.parse_run(args, ws)
    assert names == config.plugins == ["background-anchor"] and config.model_settings["plugins"] == ["background-anchor"]
    args = commands.run_args(dict(form, plugins=[]), commands.absolute(ws))  # unticked: off
    assert args[args.index("no:background-anchor") - 1] == "--plugin"
    config, names = commands.parse_run(args, ws)
    assert names == config.plugins == ["no:background-anchor"] and "plugins" not in config.model_settings
    # switching the weights to the full fine-tune unticks what needs adapters; back to LoRA ticks the model's again
    assert commands.ticked_for_weights("full", ["background-anchor", "tensorboard"], "bas-mini") == ["tensorboard"]
    assert commands.ticked_for_weights("lora", ["tensorboard"], "bas-mini") == ["tensorboard", "background-anchor"]
    assert commands.ticked_for_weights("lora", ["tensorboard"], "some/model") == ["tensorboard"]
    # a plugin the model recommends that the page has no box for (a default one here) is never turned off by it
    import bas.mini

    monkeypatch.setattr(bas.mini, "RECOMMENDED", {**WITH_ANCHOR, "plugins": ["background-anchor", "attention-contrast", "sam-masks"]})
    assert "sam-masks" not in commands.optional_plugins() and "attention-contrast" in commands.optional_plugins()
    args = commands.run_args(dict(form, plugins=[]), commands.absolute(ws))
    assert [args[i + 1] for i, a in enumerate(args) if a == "--plugin"] == ["no:background-anchor", "no:attention-contrast"]
    monkeypatch.setattr(bas.mini, "RECOMMENDED", WITH_ANCHOR)
    # the page resumes a command-line run with the same plugins, so the same run
    from bas.core.api import run_plugins
    from bas.core.checkpoint import check_same_run

    values = {"scene": ws.root / "scenes" / "a", "model": "bas-mini", "out": ws.root / "runs" / "a"}
    ran = make_config(run_plugins(Plugins(), values, []), values, [])
    saved = json.loads(json.dumps(ran.to_json(), default=str))
    again, _ = commands.parse_run(commands.config_args(saved), ws)
    assert again.plugins == ran.plugins == ["background-anchor"]
    check_same_run(saved, json.loads(json.dumps(again.to_json(), default=str)))
    # a run interrupted before the model recommended the plugin, or one that turned it off: the plugins are named, and how to resume
    older = {**saved, "plugins": [], "options": {k: v for k, v in saved["options"].items() if k != "background_anchor_weight"}}
    said = (
        r"^The checkpoint was made with plugins {}, but this command runs {}: bas-mini's recommended plugins differ; resume with the "
        r"interrupted run's plugins \(--plugin NAME turns one on, --plugin no:NAME off\), or use --overwrite to start over\.$"
    )
    with pytest.raises(BasError, match=said.format(r"\[\]", r"\['background-anchor'\]")):
        check_same_run(older, saved)
    off = make_config(Plugins(["no:background-anchor"]), values, ["no:background-anchor"]).to_json()
    with pytest.raises(BasError, match=said.format(r"\['background-anchor'\]", r"\['no:background-anchor'\]")):
        check_same_run(saved, json.loads(json.dumps(off, default=str)))
    mine = make_config(run_plugins(Plugins(["tensorboard"]), values, ["tensorboard"]), values, ["tensorboard"]).to_json()
    with pytest.raises(
        BasError,
        match=r"^The checkpoint was made with plugins=\['background-anchor'\] but this command has "
        r"\['tensorboard', 'background-anchor'\]; resume with the same options",
    ):
        check_same_run(saved, json.loads(json.dumps(mine, default=str)))  # the user's own plugin: the user's difference


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            "background-anchor",
            r"^Plugin 'mine' recommends plugins='background-anchor' for my-model; recommend a list of plugin names, or pass "
            r"--no-model-defaults\.$",
        ),
        (
            ["no-such-plugin"],
            r"^Plugin 'mine' recommends plugin no-such-plugin for my-model, which is not installed; install it, or pass "
            r"--no-model-defaults\.$",
        ),
    ],
)
def test_a_bad_plugin_recommendation_is_the_recommending_plugins_one_line_error(bad, message, tmp_path):
    pm = Plugins(extra=[("mine", Recommends({"plugins": bad}))])
    with pytest.raises(BasError, match=message):
        make_config(pm, {"model": "my-model", "out": tmp_path / "out"}, [])
    assert make_config(pm, {"model": "my-model", "out": tmp_path / "out", "model_defaults": False}, []).plugins == []


class NeedsAdapters:
    """A community loss term that asks the base model, as background-anchor does."""

    @bas.hookimpl
    def bas_register_loss_terms(self, register):
        from bas.core.components import LossTerm

        class Asks(LossTerm):
            name = "asks"
            needs_adapters = True

            def __init__(self, config):
                pass

            def __call__(self, batch):  # pragma: no cover - never reached: refused first
                raise AssertionError

        register("asks", Asks)


def test_a_loss_term_that_needs_adapters_is_refused_under_the_full_fine_tune_before_any_weight_loads(invoke, scene, tmp_path):
    from bas.core.training import adapter_conflicts, resolve

    assert adapter_conflicts(Plugins(extra=[("asker", NeedsAdapters())])) == []  # lora adds adapters
    full = Plugins(["full"], extra=[("asker", NeedsAdapters())])
    assert adapter_conflicts(full) == ["asker"]
    with pytest.raises(
        BasError,
        match=r"^Plugin asker asks the base model beside the adapted one, so it needs an adapter weight strategy "
        r"\(lora\), and 'full' fine-tunes the base model itself; drop --plugin full, or turn it off with "
        r"--plugin no:asker\.$",
    ):
        resolve(full, make_config(full, {"model": "some/model", "out": tmp_path / "out"}, ["full"]))
    result = invoke("run", "--plan", "--scene", scene, "--model", "bas-mini", "--device", "cpu", "-p", "full", "-p", "background-anchor")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: Plugin background-anchor asks the base model beside the adapted one, so it needs an adapter weight strategy (lora), and "
        "'full' fine-tunes the base model itself; drop --plugin full, or turn it off with --plugin no:background-anchor."
    )
