"""The command line and Python API end to end on the tiny model, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import click
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import bas
from bas.cli import add_plugin_commands
from bas.core import plugins as plugins_module

from conftest import quick_run_args


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, scene):
    from click.testing import CliRunner

    from bas.cli import cli

    out = tmp_path_factory.mktemp("runs") / "lora"
    result = CliRunner().invoke(cli, [str(a) for a in quick_run_args(scene, tiny_model, out, "--init-token", "ball", "--init-token", "box")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_run_writes_handles_lora_and_run_json(lora_run, tiny_model):
    out, output = lora_run
    assert "Handles: <asset0> <asset1>" in output
    handles = load_file(str(out / "handles.safetensors"))
    assert set(handles) == {"<asset0>", "<asset1>"} and handles["<asset0>"].shape == (32,)
    info = json.loads((out / "run.json").read_text())
    assert info["model"] == str(tiny_model) and info["weights"] == "lora" and info["seed"] == 0
    assert [len(info["history"][p]) for p in ("phase1", "phase2")] == [3, 3]
    assert {"loss", "diffusion", "attention"} <= set(info["history"]["phase1"][0])
    assert info["plugins"]["lora"]["version"] == bas.__version__ and info["plugins"]["lora"]["source"] == "built-in"
    assert info["config"]["init_tokens"] == ["ball", "box"] and info["config"]["options"]["lora_rank"] == 8
    assert {"load_s", "phase1_s", "phase2_s", "total_s"} <= set(info["times"])
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files were left behind"


def test_lora_output_loads_into_a_plain_diffusers_pipeline_and_changes_it(lora_run, tiny_model):
    from diffusers import StableDiffusionPipeline

    out, _ = lora_run
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a photo of a ball", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    before = sample()
    # handles.safetensors holds every handle in one file; the README's lines use embeddings/ (test_export.py)
    pipe.load_lora_weights(str(out / "lora"))
    for token, row in load_file(str(out / "handles.safetensors")).items():
        pipe.load_textual_inversion({token: row}, token=token)
    assert pipe.tokenizer.convert_tokens_to_ids("<asset1>") == len(pipe.tokenizer) - 1
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    assert any("lora" in n for n, _ in pipe.text_encoder.named_parameters())
    assert not np.allclose(before, sample())


@pytest.mark.old_stack  # also run on the oldest supported stack (CI)
def test_generate_writes_pngs_at_the_run_resolution(lora_run, invoke, tmp_path):
    out, _ = lora_run
    result = invoke("generate", out, "a photo of <asset0> at the beach", "<asset1>", "--num-images", 2, "--steps", 2, "--out-dir", tmp_path / "imgs")
    assert result.exit_code == 0, result.output
    paths = sorted((tmp_path / "imgs").glob("*.png"))
    assert [p.name for p in paths] == [
        "a-photo-of-asset0-at-the-beach-seed0.png", "a-photo-of-asset0-at-the-beach-seed1.png",
        "asset1-seed0.png", "asset1-seed1.png", "grid-a-photo-of-asset0-at-the-beach-and-1-more-seed0.png",
    ]
    assert Image.open(paths[0]).size == (128, 128)


def test_generate_uses_the_learned_handles(lora_run, tmp_path):
    out, _ = lora_run
    from bas.generation.generate import load_run_pipeline

    pipe, _ = load_run_pipeline(out, device="cpu")
    handles = load_file(str(out / "handles.safetensors"))
    emb = pipe.text_encoder.get_input_embeddings().weight
    for token, row in handles.items():
        assert torch.equal(emb[pipe.tokenizer.convert_tokens_to_ids(token)], row)


def test_full_fine_tune_without_prior_preservation_says_how_to_keep_the_prior(tiny_model, scene, tmp_path):
    """The docs advise prior preservation for a full fine-tune of a large model: --plugin full
    without it says so in one line, before anything loads; with it, on bas-mini (where it was
    measured to change nothing) or without a phase 2, nothing is said."""
    import warnings

    from bas.core.api import make_config
    from bas.core.plugins import Plugins
    from bas.core.training import resolve

    def resolved(names, **values):
        pm = Plugins(names)
        return resolve(pm, make_config(pm, {"scene": scene, "model": str(tiny_model), "out": tmp_path / "out", **values}, names))

    with pytest.warns(UserWarning, match=r"^--plugin full fine-tunes every weight .* without prior preservation, .* "
                                         r"add --plugin prior-preservation to keep its prior \(docs/paper.md, 'Prior preservation'\)\.$") as record:
        resolved(["full"])
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved(["full", "prior-preservation"])
        resolved(["full"], model="bas-mini")
        resolved(["full"], phase2_steps=0)
        resolved([])  # LoRA


def test_full_fine_tune_writes_a_loadable_pipeline(invoke, scene, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "full"
    result = invoke(*quick_run_args(scene, tiny_model, out, "--plugin", "full"))
    assert result.exit_code == 0, result.output
    assert not (out / "lora").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "pipeline"))
    handles = load_file(str(out / "handles.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<asset0>", "<asset1>"])
    emb = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(emb[ids[0]], handles["<asset0>"])
    result = invoke("generate", out, "a photo of <asset1>", "--num-images", 1, "--steps", 2)
    assert result.exit_code == 0 and (out / "samples" / "a-photo-of-asset1-seed0.png").is_file()


def test_python_api(scene, tiny_model, tmp_path):
    from bas import extract, generate

    run = extract(scene / "img.png", [scene / "mask0.png", scene / "mask1.png"], tmp_path / "api", model=str(tiny_model),
                  phase1_steps=2, phase2_steps=2, quiet=True, lora_rank=4)
    assert run.info["config"]["options"]["lora_rank"] == 4
    paths = generate(tmp_path / "api", "a photo of <asset0>", num_images=1, steps=2)
    assert paths[0].is_file()
    with pytest.raises(bas.core.errors.BasError, match="Unknown option"):
        extract(scene / "img.png", [scene / "mask0.png"], tmp_path / "x", lora_rnak=4)


def test_a_finished_run_is_not_overwritten_without_the_flag(lora_run, invoke, scene, tiny_model):
    out, _ = lora_run
    before = (out / "run.json").read_bytes()
    result = invoke(*quick_run_args(scene, tiny_model, out))
    assert result.exit_code == 1 and "pass --overwrite" in result.output
    assert (out / "run.json").read_bytes() == before


def run_bas(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bas.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["run", "--plugin", "nope", "--out", "x"], "Unknown plugin 'nope'; available plugins: adamw, attention-contrast, attention-loss, "),
    (["run", "--image", "{scene}/img.png", "--mask", "{scene}/missing.png", "--out", "{tmp}/o", "--model", "{model}"], "Mask file"),
    (["generate", "{tmp}", "a photo of <asset0>"], "is not a finished bas run"),
    (["run", "--scene", "{scene}", "--out", "{tmp}/o", "--model", "{tmp}"], "is not a diffusers pipeline folder"),
])
def test_user_errors_are_one_line_and_a_nonzero_exit(args, message, scene, tiny_model, tmp_path):
    args = [a.format(scene=scene, tmp=tmp_path, model=tiny_model) for a in args]
    proc = run_bas(*args)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_tiny_model_command_writes_a_loadable_pipeline(invoke, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = invoke("tiny-model", tmp_path / "m", "--seed", 3)
    assert result.exit_code == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    assert pipe.tokenizer.model_max_length == 77 and (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_demo_runs_offline(invoke, tmp_path):
    result = invoke("demo", "--out", tmp_path / "demo", "--steps", 2)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "demo.png").is_file()
    assert len(list((tmp_path / "demo" / "run" / "samples").glob("*.png"))) == 8  # 4 prompts, 2 seeds
    assert json.loads((tmp_path / "demo" / "run" / "run.json").read_text())["model"] == "bas-mini"


def test_plugins_can_add_commands(monkeypatch):
    module = types.ModuleType("hello_plugin")

    @bas.hookimpl
    def bas_register_commands(cli):
        @cli.command()
        def hello():
            click.echo("hi")

    module.bas_register_commands = bas_register_commands

    class EntryPoint:
        name, value, dist = "hello", "hello_plugin", None

        def load(self):
            return module

    monkeypatch.setattr(plugins_module, "_entry_points", lambda: {"hello": EntryPoint()})
    group = click.Group()
    add_plugin_commands(group)
    assert "hello" in group.commands


def test_readme_test_command_is_what_ci_runs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ci = (root / ".ci" / "run").read_text()
    readme = root / "README.md"
    command = [l for l in ci.splitlines() if "pytest" in l][0].strip()
    assert command in readme.read_text()
