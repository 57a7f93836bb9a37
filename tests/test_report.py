"""The run report (OUT/report/), its attention maps and validation samples, and TensorBoard logging."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from bas.core.api import make_config
from bas.core.errors import BasError
from bas.core.plugins import Plugins
from bas.generation.sampling import sample_run
from bas.core.training import Run
from bas.plugins.attention_loss import CrossAttentionLoss, handle_attention_maps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.open = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing"


def test_report_holds_valid_pngs_per_phase_and_checkpoint_and_an_index(rich_run):
    report = rich_run / "report"
    pngs = {f"{kind}-phase{p}.png" for kind in ("loss", "attention") for p in (1, 2)}
    pngs |= {f"validation-phase{p}-step0000{s}.png" for p in (1, 2) for s in (2, 3)}  # --validate-every 2, and each phase's end
    assert {p.name for p in report.iterdir()} == pngs | {"index.html"}
    for name in pngs:
        assert (report / name).read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(report / name) as image:
            image.verify()
    with Image.open(report / "validation-phase2-step00003.png") as grid:
        assert grid.size[0] == 2 * 128  # --num-validation-images 2 at the run's 128 px
    html = (report / "index.html").read_text()
    assert html.startswith("<!doctype html>")
    parser = Links()
    parser.feed(html)
    assert parser.open == [] and set(parser.images) == pngs
    for text in ("&lt;asset2&gt;", "background (complement of all masks)", "phase2_s"):
        assert text in html


def test_attention_maps_and_validation_samples_leave_the_training_state_alone(scene, tiny_model, tmp_path):
    plugins = Plugins()
    values = {"out": tmp_path / "r", "image": scene / "img.png", "masks": [scene / "mask0.png", scene / "mask1.png"],
              "model": str(tiny_model), "device": "cpu"}
    run = Run(make_config(plugins, values, []), plugins)
    run.load()
    loss = CrossAttentionLoss(run.config)
    loss.setup(run)  # the report runs while the loss's capture processors are installed
    c = run.components
    processors = dict(c.unet.attn_processors)
    c.unet.train()
    states = (run.generator.get_state(), run.rng.getstate(), torch.get_rng_state())

    maps = handle_attention_maps(run)
    assert maps.shape == (2, 16, 16)  # 128 px: 16x16 latents, maps at the paper's 16x16 (not a quarter of the latent side)
    assert torch.allclose(maps.amax(dim=(-2, -1)), torch.ones(2)) and maps.min() >= 0
    assert not torch.allclose(maps[0], maps[1])
    assert torch.equal(handle_attention_maps(run), maps)
    rows = sample_run(run, ["a photo of <asset0>", "a photo of <asset1>"], seeds=[0, 1], steps=2)
    assert [len(r) for r in rows] == [2, 2] and rows[0][0].size == (128, 128)
    assert not np.array_equal(np.asarray(rows[0][0]), np.asarray(rows[0][1]))

    assert torch.equal(run.generator.get_state(), states[0]) and run.rng.getstate() == states[1]
    assert torch.equal(torch.get_rng_state(), states[2])
    assert c.unet.training and not c.text_encoder.training
    assert dict(c.unet.attn_processors) == processors
    assert loss.store.forwards == []  # nothing recorded into the loss's store
    loss.teardown(run)


def test_tensorboard_logs_every_step_and_the_validation_grids(rich_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(rich_run / "logs"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/diffusion", "train/attention", "train/phase", "train/seconds_per_step"} <= set(tags["scalars"])
    history = json.loads((rich_run / "run.json").read_text())["history"]
    losses = [h["loss"] for h in history["phase1"] + history["phase2"]]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([e.value for e in logged], losses, rtol=1e-6)
    assert [e.value for e in events.Scalars("train/phase")] == [1, 1, 1, 2, 2, 2]
    (image_tag,) = tags["images"]
    assert image_tag == "validation/a-photo-of-asset0-and-asset2"
    assert [e.step for e in events.Images(image_tag)] == [2, 3, 5, 6]


def test_validate_every_without_a_prompt_is_an_error_before_anything_loads(scene, tmp_path):
    from bas import extract

    with pytest.raises(BasError, match="--validate-every needs something to sample"):
        extract(scene / "img.png", [scene / "mask0.png"], tmp_path / "x", model=str(tmp_path / "no-model"), validate_every=5)
    assert not (tmp_path / "x").exists()
