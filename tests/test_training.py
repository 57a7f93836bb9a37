"""What each phase trains, on the tiny model, observed through a plugin like any other."""

from __future__ import annotations

import pytest
import torch

import bas
from bas.core.api import make_config
from bas.core.plugins import Plugins
from bas.core.training import extract
from conftest import Snapshots, changed


def run_with_snapshots(scene, model, out, plugin_names=(), **values):
    snaps = Snapshots()
    pm = Plugins(plugin_names, extra=[("snapshots", snaps)])
    values = {"scene": scene, "model": str(model), "out": out, "quiet": True, "phase1_steps": 4, "phase2_steps": 4, **values}
    run = extract(make_config(pm, values, plugin_names), pm)
    return run, snaps


HANDLES = "text_encoder.embeddings.token_embedding.handles"  # transformers 5 names them without text_model.
BASE_ROWS = "text_encoder.embeddings.token_embedding.base.weight"


def test_phase1_changes_only_the_handle_rows(scene, tiny_model, tmp_path):
    run, snaps = run_with_snapshots(scene, tiny_model, tmp_path / "out", phase2_steps=0)
    assert changed(snaps, 1) == {HANDLES}
    # the full embedding matrix as a loader sees it: old rows bit-identical, new rows trained
    full = run.handle_embedding.weight.detach()
    assert torch.equal(full[: run.handle_embedding.num_base], snaps.start[1][BASE_ROWS])
    assert not (tmp_path / "out" / "lora").exists()


def test_phase2_lora_changes_only_lora_parameters_and_handles(scene, tiny_model, tmp_path):
    run, snaps = run_with_snapshots(scene, tiny_model, tmp_path / "out", phase1_steps=2)
    moved = changed(snaps, 2)
    assert HANDLES in moved
    others = moved - {HANDLES}
    assert others and all("lora_" in n for n in others)
    assert any(n.startswith("unet.") for n in others) and any(n.startswith("text_encoder.") for n in others)
    lora_b = [n for n in snaps.end[2] if "lora_B" in n]
    assert lora_b and all(n in moved for n in lora_b)  # LoRA up-projections start at zero and all train


def test_no_lora_text_encoder_keeps_the_text_encoder_frozen(scene, tiny_model, tmp_path):
    run, snaps = run_with_snapshots(scene, tiny_model, tmp_path / "out", phase1_steps=1, lora_text_encoder=False)
    assert {n.split(".")[0] for n in changed(snaps, 2) - {HANDLES}} == {"unet"}


def test_full_fine_tune_trains_unet_and_text_encoder_but_not_old_vocabulary(scene, tiny_model, tmp_path):
    run, snaps = run_with_snapshots(scene, tiny_model, tmp_path / "out", ["full"], phase1_steps=1, phase2_lr=1e-3)
    moved = changed(snaps, 2)
    assert BASE_ROWS not in moved and HANDLES in moved
    assert any(n.startswith("unet.") for n in moved)
    assert any(n.startswith("text_encoder.") and n != HANDLES for n in moved)
    assert not any("lora_" in n for n in snaps.end[2])


def test_seeded_runs_are_deterministic(scene, tiny_model, tmp_path):
    a, _ = run_with_snapshots(scene, tiny_model, tmp_path / "a", phase1_steps=3, phase2_steps=3)
    b, _ = run_with_snapshots(scene, tiny_model, tmp_path / "b", phase1_steps=3, phase2_steps=3)
    c, _ = run_with_snapshots(scene, tiny_model, tmp_path / "c", phase1_steps=3, phase2_steps=3, seed=1)
    assert a.info["history"] == b.info["history"]
    ha, hb, hc = (r.handles_state() for r in (a, b, c))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    assert not all(torch.equal(ha[k], hc[k]) for k in ha)


def test_v_prediction_model_trains(scene, tiny_vpred_model, tmp_path):
    run, _ = run_with_snapshots(scene, tiny_vpred_model, tmp_path / "out", phase1_steps=2, phase2_steps=2)
    assert run.info["prediction_type"] == "v_prediction"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in run.info["history"]["phase2"])


def test_gradient_checkpointing_keeps_the_attention_loss_differentiable(scene, tiny_model, tmp_path):
    plain, _ = run_with_snapshots(scene, tiny_model, tmp_path / "a", phase1_steps=2, phase2_steps=2)
    ckpt, _ = run_with_snapshots(scene, tiny_model, tmp_path / "b", phase1_steps=2, phase2_steps=2, gradient_checkpointing=True)
    hp, hc = plain.handles_state(), ckpt.handles_state()
    for k in hp:
        torch.testing.assert_close(hp[k], hc[k], rtol=1e-4, atol=1e-5)


def test_prior_preservation_generates_class_images_and_adds_its_loss(scene, tiny_model, tmp_path):
    run, _ = run_with_snapshots(
        scene, tiny_model, tmp_path / "out", ["prior-preservation"], phase1_steps=2, phase2_steps=2,
        num_class_images=2, class_generation_steps=2,
    )
    assert len(list((tmp_path / "out" / "class_images").glob("*.png"))) == 2
    assert all("prior" in h for h in run.info["history"]["phase2"])
    assert not any("prior" in h for h in run.info["history"]["phase1"])
    assert {t["name"] for t in run.info["loss_terms"]} == {"diffusion", "attention", "prior"}


def test_prior_loss_is_skipped_in_phase1_because_its_gradient_there_is_zero(scene, tiny_model, tmp_path):
    run, _ = run_with_snapshots(
        scene, tiny_model, tmp_path / "out", ["prior-preservation"], phase1_steps=1, phase2_steps=0,
        num_class_images=1, class_generation_steps=2,
    )
    prior = next(t for t in run.resolved.loss_terms if t.name == "prior")
    assert prior.phases == (2,)
    prior.run = run  # the model as phase 1 trains it: only the handles require gradients
    trainable = [p for m in (run.components.unet, run.components.text_encoder) for p in m.parameters() if p.requires_grad]
    assert trainable == [run.handle_embedding.handles]
    prior(None).backward()
    assert run.handle_embedding.handles.grad is not None and not run.handle_embedding.handles.grad.any()


def test_background_anchor_holds_the_adapted_prediction_to_the_base_models_outside_the_masks_only(scene, tiny_model, tmp_path):
    import dataclasses

    from bas.core.training import latent_mask

    run, snaps = run_with_snapshots(scene, tiny_model, tmp_path / "out", ["background-anchor"], phase1_steps=1, phase2_steps=2, phase2_lr=1e-2)
    assert all("background-anchor" in h for h in run.info["history"]["phase2"])
    assert not any("background-anchor" in h for h in run.info["history"]["phase1"])
    term = next(t for t in run.resolved.loss_terms if t.name == "background-anchor")
    term.setup(run)
    lora = [p for n, p in run.components.unet.named_parameters() if "lora_" in n]
    batch = run.step_batch(2, 1)
    with torch.no_grad(), term.adapters_off():
        base = run.predict(batch.noisy_latents, batch.timesteps, batch.conditioning).float()
    assert all(p.requires_grad for p in lora)  # switched back on, still training
    with torch.no_grad():
        adapted = run.predict(batch.noisy_latents, batch.timesteps, batch.conditioning).float()
    assert not torch.allclose(adapted, base)  # phase 2 moved the adapters, so the two predictions differ
    loss = term(batch)
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)  # it trains the adapters
    # what the adapted model predicts inside the masks is its own business: only the outside counts
    # (the mask is soft: where it is 1 nothing counts, where it is 0 everything, weighted in between)
    inside = (latent_mask(batch.union_mask, base) >= 1).float()
    assert 0 < inside.mean() < 1
    only_inside = dataclasses.replace(batch, model_pred=base + (adapted - base) * inside)
    assert term(only_inside).item() == pytest.approx(0.0, abs=1e-12)
    only_outside = dataclasses.replace(batch, model_pred=base + (adapted - base) * (1 - inside))
    assert term(only_outside).item() == pytest.approx(term(dataclasses.replace(batch, model_pred=adapted)).item(), rel=1e-5)


def test_background_anchor_with_the_full_fine_tune_is_one_clear_error(scene, tiny_model, tmp_path):
    from bas.core.errors import BasError

    with pytest.raises(BasError, match="needs an adapter weight strategy"):
        run_with_snapshots(scene, tiny_model, tmp_path / "out", ["full", "background-anchor"], phase1_steps=1, phase2_steps=1)


@pytest.mark.parametrize("values, message", [
    ({"phase1_steps": -1}, "--phase1-steps must be 0 or more"),
    ({"phase1_steps": 0, "phase2_steps": 0}, "Both phases have 0 steps"),
    ({"phase2_lr": 0.0}, "--phase2-lr must be positive"),
    ({"resolution": 100}, "multiple of 64"),
    ({"optimizer": "sgd"}, "Unknown optimizer 'sgd'"),
    ({"precision": "fp16", "device": "cpu"}, "fp16 needs a CUDA GPU"),
    ({"optimizer": "adamw8bit", "device": "cpu"}, "adamw8bit needs a CUDA GPU"),
    ({"init_tokens": ["ball"]}, "1 --init-token values were given for 2 masks"),
    ({"init_tokens": ["ball", "\u2603\u2603"]}, None),
])
def test_bad_options_are_one_clear_error(scene, tiny_model, tmp_path, values, message):
    if message is None:  # a word made only of unknown characters still has byte-level sub-tokens
        run_with_snapshots(scene, tiny_model, tmp_path / "out", phase1_steps=1, phase2_steps=0, **values)
        return
    with pytest.raises(bas.core.errors.BasError, match=message):
        run_with_snapshots(scene, tiny_model, tmp_path / "out", **values)
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.mark.parametrize("family, values, device, message", [
    ("sd", {"optimizer": "adamw8bit"}, "cpu", "--optimizer adamw8bit needs a CUDA GPU; use --optimizer adamw on the CPU"),
    ("sd", {"optimizer": "adamw8bit"}, "cuda", "bitsandbytes could not be loaded"),
    ("flux", {"quantize": "nf4"}, "cpu", "--quantize nf4 needs a CUDA GPU"),
    ("flux", {"quantize": "int8", "optimizer": "adamw"}, "cuda", "--quantize int8 loads FLUX through bitsandbytes, which could not be loaded"),
    ("flux", {}, "cuda", "--quantize nf4 loads FLUX through bitsandbytes"),  # FLUX's own defaults on CUDA: nf4 and 8-bit AdamW
])
def test_device_dependent_options_are_refused_before_any_model_loads(family, values, device, message, scene, tiny_model, tiny_flux_model,
                                                                      tmp_path, monkeypatch):
    """The optimizer's ``check`` and the family's ``check_quantization`` (bitsandbytes: CUDA, and an
    importable library) run before a model loads; a CUDA machine without bitsandbytes is simulated."""
    import sys

    from bas.core import training
    from bas.core.family import UNetFamily
    from bas.plugins.flux import Flux

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(UNetFamily, "load", loaded)
    monkeypatch.setattr(Flux, "load", loaded)
    if device == "cuda":
        monkeypatch.setattr(training, "resolve_device", lambda name: torch.device("cuda"))
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    model = tiny_flux_model if family == "flux" else tiny_model
    with pytest.raises(bas.core.errors.BasError, match=message):
        bas.extract(None, (), tmp_path / "out", plugins=[], scene=scene, model=str(model), precision="fp32", quiet=True, **values)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("with_attention_loss", [True, False])
def test_attention_contrast_trains_the_handles_with_or_without_the_attention_loss(scene, tiny_model, tmp_path, with_attention_loss):
    names = ["attention-contrast"] + ([] if with_attention_loss else ["no:attention-loss"])
    run, _ = run_with_snapshots(scene, tiny_model, tmp_path / "out", names, phase1_steps=2, phase2_steps=1)
    assert all("attention-contrast" in h for phase in ("phase1", "phase2") for h in run.info["history"][phase])
    assert all(("attention" in h) == with_attention_loss for h in run.info["history"]["phase1"])
    unet = run.components.unet
    assert not any(type(m.processor).__name__ == "CaptureCrossAttention" for n, m in unet.named_modules() if n.endswith("attn2"))
    term = next(t for t in run.resolved.loss_terms if t.name == "attention-contrast")
    for t in run.resolved.loss_terms:  # as the run sets them up: the attention loss (if on) before the contrast that shares it
        if t.name in ("attention", "attention-contrast"):
            t.setup(run)
    try:
        assert term.own_capture == (not with_attention_loss)
        batch = run.step_batch(1, 1)
        while len(batch.concepts) < 2:  # union sampling may show one concept: contrast needs two
            batch = run.step_batch(1, 1)
        run.handle_embedding.handles.grad = None
        loss = term(batch)
        assert loss.item() > 0
        loss.backward()
        grad = run.handle_embedding.handles.grad
        assert grad is not None and grad.abs().sum() > 0  # it pulls on the handles
    finally:
        for t in run.resolved.loss_terms:
            if t.name in ("attention", "attention-contrast"):
                t.teardown(run)
