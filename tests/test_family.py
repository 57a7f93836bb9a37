"""Model families as plugins: detection from model_index.json, --family, the defaults a family picks,
and the bad input a family refuses with one line before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

import bas
from bas.core.api import make_config
from bas.core.errors import BasError
from bas.core.family import choose_family, model_families
from bas.core.plugins import Plugins
from bas.core.training import Run
from bas.plugins.sd import StableDiffusion
from bas.plugins.sdxl import StableDiffusionXL


class MyFamily(StableDiffusion):
    """A third-party family: SD's verbs for pipelines that name themselves MyPipeline."""

    name = "mine"
    default = False
    recognised_pipelines = ("MyPipeline",)


class MyFamilyPlugin:
    @bas.hookimpl
    def bas_register_model_families(self, register):
        register("mine", MyFamily)


def fake_pipeline(tmp_path, class_name):
    folder = tmp_path / class_name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


def test_built_in_families_are_plugins_and_detected_from_model_index(tiny_model, tiny_sdxl_model, tmp_path):
    pm = Plugins()
    assert set(model_families(pm)) == {"sd", "sdxl", "flux"}
    assert choose_family(pm, str(tiny_model), None).name == "sd"
    assert choose_family(pm, str(tiny_sdxl_model), None).name == "sdxl"
    assert choose_family(pm, None, None).default_model == "stabilityai/stable-diffusion-2-1-base"
    assert choose_family(pm, None, "sdxl").default_model == "stabilityai/stable-diffusion-xl-base-1.0"
    mine = fake_pipeline(tmp_path, "MyPipeline")
    assert choose_family(pm, str(mine), "sdxl").name == "sdxl"  # --family loads a pipeline no family knows as its own
    with pytest.raises(BasError, match="--family sdxl does not match .*names a StableDiffusionPipeline, which the sd family loads"):
        choose_family(pm, str(tiny_model), "sdxl")  # but not one another family knows
    with_plugin = Plugins(extra=[("mine", MyFamilyPlugin())])
    assert choose_family(with_plugin, str(mine), None).name == "mine"
    assert not Plugins(["no:sdxl", "no:flux"]).registry("model family").entries.keys() - {"sd"}


@pytest.mark.parametrize("args, message", [
    (["--model", "{other}"], "is a HunyuanDiTPipeline, which no model family knows (families: flux, sd, sdxl); pass --family NAME"),
    (["--model", "{tiny}", "--family", "nope"], "Unknown model family 'nope'; choose one of: flux, sd, sdxl"),
    (["--model", "{tiny}", "--quantize", "nf4"], "--quantize nf4 is not a quantisation the sd family loads (it loads none); use --quantize none"),
    (["--model", "{sdxl}", "--resolution", "96"], "--resolution must be a multiple of 64 for sdxl models (such as 512), not 96"),
    (["--model", "{sdxl}", "--attention-res", "2"], "--attention-res 2 is too small to hold a mask"),
    (["--model", "{sdxl}", "--attention-res", "16"], "no cross-attention layers at 16x16; set --attention-res to one of [4, 8]"),
])
def test_family_bad_input_is_one_line_and_nothing_is_written(args, message, scene, tiny_model, tiny_sdxl_model, tmp_path, capsys):
    from bas.cli import main

    other = fake_pipeline(tmp_path, "HunyuanDiTPipeline")
    out = tmp_path / "out"
    argv = [a.format(other=other, tiny=tiny_model, sdxl=tiny_sdxl_model) for a in map(str, args)]
    with pytest.raises(SystemExit) as exc:
        main(["run", "--scene", str(scene), "--out", str(out), "--quiet", "--phase1-steps", "1", "--phase2-steps", "0", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and err[0].startswith("Error: ") and message in err[0], err
    assert not out.exists()


def test_a_family_picks_defaults_only_where_the_user_chose_none(scene, tiny_sdxl_model, tmp_path, monkeypatch):
    # SDXL's choices for a CUDA device; on the CPU it picks nothing
    assert StableDiffusionXL().memory_defaults(torch.device("cuda"), "lora") == {"gradient_checkpointing": True}
    assert StableDiffusionXL().memory_defaults(torch.device("cuda"), "full") == {"gradient_checkpointing": True, "optimizer": "adamw8bit"}
    assert StableDiffusionXL().memory_defaults(torch.device("cpu"), "lora") == {} == StableDiffusion().memory_defaults(torch.device("cuda"), "full")
    monkeypatch.setattr(StableDiffusionXL, "memory_defaults", lambda self, device, strategy: {"gradient_checkpointing": True})
    pm = Plugins()
    base = {"scene": scene, "model": str(tiny_sdxl_model), "quiet": True}
    chosen = Run(make_config(pm, dict(base, out=tmp_path / "a"), []), pm)
    assert chosen.gradient_checkpointing is True and chosen.family_defaults == {"gradient_checkpointing": True}
    assert chosen.optimizer_name == "adamw" and chosen.config.gradient_checkpointing is None  # run.json's config: what was asked
    user = Run(make_config(pm, dict(base, out=tmp_path / "b", gradient_checkpointing=False), []), pm)
    assert user.gradient_checkpointing is False and user.family_defaults == {}
