"""SDXL on a tiny random SDXL pipeline: what each phase trains in both text encoders, the attention
loss's maps, generation and editing through diffusers' SDXL pipeline, and the family's files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import bas
from bas.core.api import make_config
from bas.core.plugins import Plugins
from bas.core.training import extract

ENCODERS = ("text_encoder", "text_encoder_2")


class Snapshots:
    """An observer plugin that records every trainable module's parameters at the start and end of each phase."""

    def __init__(self):
        self.start, self.end, self.maps = {}, {}, []

    @staticmethod
    def params(run):
        return {f"{prefix}.{name}": p.detach().float().clone()
                for prefix, module in run.components.trainable_modules().items() for name, p in module.named_parameters()}

    def on_phase_start(self, run, phase):
        self.start[phase] = self.params(run)

    def on_phase_end(self, run, phase):
        self.end[phase] = self.params(run)

    @bas.hookimpl
    def bas_register_observers(self, register):
        register("snapshots", lambda config: self)


def changed(snaps, phase):
    start, end = snaps.start[phase], snaps.end[phase]
    return {n for n in end if n not in start or not torch.equal(start[n], end[n])}


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_sdxl_model, scene):
    snaps = Snapshots()
    pm = Plugins([], extra=[("snapshots", snaps)])
    out = tmp_path_factory.mktemp("sdxl") / "run"
    values = {"scene": scene, "model": str(tiny_sdxl_model), "out": out, "quiet": True, "phase1_steps": 2, "phase2_steps": 2,
              "init_tokens": ["ball", "box"]}
    run = extract(make_config(pm, values, []), pm)
    return run, snaps


def handle_names(run):
    """The parameter names of each text encoder's handle rows."""
    names = {}
    for prefix, module in run.components.trainable_modules().items():
        for name, p in module.named_parameters():
            if any(p is e.handles for e in run.handle_embeddings):
                names[prefix] = f"{prefix}.{name}"
    return names


def test_the_family_is_detected_and_recorded(sdxl_run, tiny_sdxl_model):
    run, _ = sdxl_run
    info = json.loads((run.out / "run.json").read_text())
    assert info["family"] == "sdxl" and info["config"]["family"] == "sdxl" and info["model"] == str(tiny_sdxl_model)
    assert [e.name for e in run.components.text_encoders] == list(ENCODERS)


def test_phase1_changes_only_the_handle_rows_of_both_encoders(sdxl_run):
    run, snaps = sdxl_run
    handles = handle_names(run)
    assert set(handles) == set(ENCODERS)
    assert changed(snaps, 1) == set(handles.values())
    for embedding in run.handle_embeddings:  # the old vocabulary is untouched; the handle rows sit after it
        full = embedding.weight.detach()
        assert torch.equal(full[: embedding.num_base], embedding.base.weight)
        assert torch.equal(full[embedding.num_base:], embedding.handles.detach())


def test_phase2_lora_changes_only_lora_parameters_and_handle_rows(sdxl_run):
    run, snaps = sdxl_run
    moved = changed(snaps, 2)
    handles = set(handle_names(run).values())
    assert handles <= moved
    others = moved - handles
    assert others and all("lora_" in n for n in others)
    # SDXL reads encoder 1's penultimate layer: its last layer's adapter gets no gradient and stays zero
    last = f"text_encoder.encoder.layers.{run.components.text_encoders[0].model.config.num_hidden_layers - 1}."
    unused = {n for n in snaps.end[2] if n.startswith(last) and "lora_B" in n}
    assert unused and not unused & moved and all(not snaps.end[2][n].any() for n in unused)
    for component in ("unet", *ENCODERS):  # adapters on the UNet and on both text encoders, every other one trained
        lora_b = [n for n in snaps.end[2] if n.startswith(component + ".") and "lora_B" in n and n not in unused]
        assert lora_b and all(n in moved for n in lora_b), component


def test_handles_file_has_a_row_per_handle_and_encoder_and_embeddings_hold_both(sdxl_run):
    run, _ = sdxl_run
    handles = load_file(str(run.out / "handles.safetensors"))
    assert sorted(handles) == ["<asset0>", "<asset1>", "text_encoder_2.<asset0>", "text_encoder_2.<asset1>"]
    widths = [e.model.get_input_embeddings().embedding_dim for e in run.components.text_encoders]
    assert handles["<asset0>"].shape == (widths[0],) and handles["text_encoder_2.<asset0>"].shape == (widths[1],)
    assert widths[0] != widths[1]
    embedding = load_file(str(run.out / "embeddings" / "asset1.safetensors"))
    assert set(embedding) == {"clip_l", "clip_g"}
    assert torch.equal(embedding["clip_l"][0], handles["<asset1>"]) and torch.equal(embedding["clip_g"][0], handles["text_encoder_2.<asset1>"])


def test_conditioning_is_both_penultimate_states_the_pooled_end_of_text_and_time_ids(sdxl_run):
    run, _ = sdxl_run
    c = run.components
    ids = run.tokenize(["a photo of <asset0> and <asset1>"])
    with torch.no_grad():
        cond = run.conditioning(ids)
        outs = [e.model(i, output_hidden_states=True) for e, i in zip(c.text_encoders, ids)]
    torch.testing.assert_close(cond.hidden_states, torch.cat([o.hidden_states[-2] for o in outs], dim=-1))
    # the pooled output is the end-of-text token's state, not the highest id's (a handle's)
    tok2 = c.text_encoders[1]
    eos = (ids[1][0] == tok2.tokenizer.eos_token_id).nonzero()[0, 0]
    handle = (ids[1][0] == run.token_ids[1]).nonzero()[0, 0]
    assert int(ids[1][0].argmax()) == int(handle)
    with torch.no_grad():
        last = outs[1].last_hidden_state[0]
        torch.testing.assert_close(cond.extra["text_embeds"][0], tok2.model.text_projection(last[eos]))
    size = run.scene.size
    assert cond.extra["time_ids"].tolist() == [[*size.original, *size.crop_top_left, *size.target]]
    assert size.target == (run.resolution, run.resolution)


def test_generate_end_to_end_through_the_sdxl_pipeline(sdxl_run, invoke, tmp_path):
    run, _ = sdxl_run
    result = invoke("generate", run.out, "a photo of <asset0> at the beach", "--steps", 2, "--num-images", 1,
                    "--scheduler", "euler", "--out-dir", tmp_path / "g", "--lora-scale", 0.5)
    assert result.exit_code == 0, result.output
    (path,) = [tmp_path / "g" / "a-photo-of-asset0-at-the-beach-seed0.png"]
    assert Image.open(path).size == (run.resolution, run.resolution)
    from bas.core.generation import load_run_pipeline

    pipe, _ = load_run_pipeline(run.out, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    handles = load_file(str(run.out / "handles.safetensors"))
    for encoder, tokenizer, prefix in ((pipe.text_encoder, pipe.tokenizer, ""), (pipe.text_encoder_2, pipe.tokenizer_2, "text_encoder_2.")):
        weight = encoder.get_input_embeddings().weight
        for token in ("<asset0>", "<asset1>"):
            assert torch.equal(weight[tokenizer.convert_tokens_to_ids(token)], handles[prefix + token])
    assert any(pipe.get_list_adapters().values())


def test_edit_through_the_sdxl_pipeline(sdxl_run, scene, invoke, tmp_path):
    from PIL import ImageDraw

    run, _ = sdxl_run
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((40, 40, 89, 89), fill=255)
    mask.save(tmp_path / "mask.png")
    result = invoke("edit", run.out, "a photo of <asset0>", "--image", scene / "img.png", "--mask", tmp_path / "mask.png",
                    "--steps", 4, "--scheduler", "euler", "--composite", "--out-dir", tmp_path / "e")
    assert result.exit_code == 0, result.output
    edited = np.asarray(Image.open(tmp_path / "e" / "edit-a-photo-of-asset0-seed0.png").convert("RGB"), dtype=np.float32)
    source = np.asarray(Image.open(scene / "img.png").convert("RGB"), dtype=np.float32)
    inside = np.asarray(mask) > 127
    assert np.abs(edited - source)[inside].mean() > 20 and np.abs(edited - source)[~inside].max() <= 1
