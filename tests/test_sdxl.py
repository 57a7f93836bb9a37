"""SDXL on a tiny random SDXL pipeline: what each phase trains in both text encoders, the attention
loss's maps, generation and editing through diffusers' SDXL pipeline, the family's files, --plugin full,
prior preservation and a non-native --resolution (resuming an SDXL run: tests/test_reliability.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import bas
import comfyui_keys
from bas.core.api import make_config
from bas.core.errors import BasError
from bas.core.plugins import Plugins
from bas.core.training import extract

from conftest import Snapshots as BaseSnapshots, changed, check_card_writes_the_generated_image, exported_card  # noqa: E402

ENCODERS = ("text_encoder", "text_encoder_2")


class Snapshots(BaseSnapshots):
    """:class:`conftest.Snapshots`, and the attention loss's maps at every step."""

    def __init__(self):
        super().__init__()
        self.maps = []

    def on_run_start(self, run):
        """Record, at every training step, the maps the attention loss captured, what the step showed, and the
        probabilities recomputed independently from each captured layer's own queries and keys."""
        term = next((t for t in run.resolved.loss_terms if t.name == "attention"), None)
        if term is None:
            return
        modules = dict(run.components.denoiser.named_modules())
        reference = {}

        def explicit(name):
            def hook(module, args, kwargs, output):
                if not torch.is_grad_enabled():
                    return
                with torch.no_grad():
                    q, k = module.to_q(args[0]).double(), module.to_k(kwargs["encoder_hidden_states"]).double()
                    heads, d = module.heads, q.shape[-1] // module.heads
                    q, k = (x.view(x.shape[0], -1, heads, d).transpose(1, 2) for x in (q, k))
                    reference[name] = ((q @ k.transpose(-1, -2)) * module.scale).softmax(-1).mean(1)
            return hook

        for name in term.layer_names:
            modules[name].register_forward_hook(explicit(name), with_kwargs=True)
        token_maps = term.token_maps

        def recording(batch):
            maps = term.store.maps_for(batch.conditioning.hidden_states)
            result = token_maps(batch)
            self.maps.append({"phase": batch.phase, "res": term.res, "layers": list(term.layer_names), "concepts": list(batch.concepts),
                              "positions": list(batch.token_positions), "ids": run.tokenize([batch.prompt]),
                              "maps": [m.detach().clone() for m in maps], "reference": [reference[n] for n in term.layer_names],
                              "token_maps": result.detach().clone()})
            return result

        term.token_maps = recording



class DenoiserCalls:
    """An observer plugin that records every training forward of the denoiser: the phase, the latents' shape and
    the SDXL time ids (the step's own forward and any a loss term makes, such as the prior's)."""

    def __init__(self):
        self.calls = []

    def on_run_start(self, run):
        def record(module, args, kwargs):
            if torch.is_grad_enabled():
                self.calls.append((run.phase, tuple(args[0].shape), kwargs["added_cond_kwargs"]["time_ids"][0].tolist()))

        run.components.denoiser.register_forward_pre_hook(record, with_kwargs=True)

    @bas.hookimpl
    def bas_register_observers(self, register):
        register("denoiser-calls", lambda config: self)


def run_sdxl(scene, model, out, plugin_names=(), **values):
    """A run on the tiny SDXL with :class:`Snapshots` and :class:`DenoiserCalls` observing it."""
    snaps, calls = Snapshots(), DenoiserCalls()
    pm = Plugins(list(plugin_names), extra=[("snapshots", snaps), ("denoiser-calls", calls)])
    values = {"scene": scene, "model": str(model), "out": out, "quiet": True, "phase1_steps": 2, "phase2_steps": 2, **values}
    run = extract(make_config(pm, values, list(plugin_names)), pm)
    return run, snaps, calls


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_sdxl_model, scene):
    run, snaps, _ = run_sdxl(scene, tiny_sdxl_model, tmp_path_factory.mktemp("sdxl") / "run", init_tokens=["ball", "box"])
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
    assert info["family"] == "sdxl" and info["config"]["family"] is None and info["model"] == str(tiny_sdxl_model)
    assert [e.name for e in run.components.text_encoders] == list(ENCODERS)


def check_captured_maps(run, snaps, latent, res):
    """The attention loss's maps at every step: at side ``res`` of the ``latent`` side's layers (the finest the
    tiny SDXL has: the default aims at the paper's 16x16), fp32 softmax probabilities over all tokens of the
    prompt, read at the shown handles' positions."""
    layers = run.family.attention_layers(run.components, latent)
    at_res = sorted(n for n, (_, side) in layers.items() if side == res)
    assert at_res and all(n.endswith("attn2") for n in at_res) and {side for _, side in layers.values()} - {res}  # other sides exist
    steps = run.config.phase1_steps + run.config.phase2_steps
    assert len(snaps.maps) == steps and {r["phase"] for r in snaps.maps} == {1, 2}
    tokens = [e.tokenizer.convert_tokens_to_ids(run.tokens) for e in run.components.text_encoders]
    for record in snaps.maps:
        assert record["res"] == res and record["layers"] == at_res and len(record["maps"]) == len(at_res)
        for m, reference in zip(record["maps"], record["reference"]):
            length = record["ids"][0].shape[1]
            assert m.dtype == torch.float32 and m.shape == (1, res * res, length) and (m >= 0).all()
            torch.testing.assert_close(m.sum(-1), torch.ones(1, res * res))  # softmax over every token, pads included
            torch.testing.assert_close(m.double(), reference, rtol=1e-4, atol=1e-7)
        for ids, handle_ids in zip(record["ids"], tokens):  # the positions hold the shown handles in both encoders' prompts
            assert [int(ids[0, p]) for p in record["positions"]] == [handle_ids[c] for c in record["concepts"]]
        picked = torch.stack(record["maps"]).mean(0)[:, :, record["positions"]].permute(0, 2, 1)
        picked = picked.reshape(1, len(record["positions"]), res, res)
        torch.testing.assert_close(record["token_maps"], picked / picked.amax(dim=(-2, -1), keepdim=True))


def test_the_attention_loss_captures_softmax_maps_of_the_handle_tokens_at_the_chosen_resolution(sdxl_run):
    run, snaps = sdxl_run
    assert run.resolution == 128  # the tiny SDXL's native size: a 16x16 latent, layers at 8x8 and 4x4: the default aims at 16, gets 8
    check_captured_maps(run, snaps, 16, 8)


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
    # SDXL reads encoder 1's penultimate layer: its last layer, which could not learn, has no adapter
    last = run.components.text_encoders[0].model.config.num_hidden_layers - 1
    assert not [n for n in snaps.end[2] if n.startswith(f"text_encoder.encoder.layers.{last}.") and "lora_" in n]
    last_2 = run.components.text_encoders[1].model.config.num_hidden_layers - 1
    assert [n for n in snaps.end[2] if f"text_encoder_2.text_model.encoder.layers.{last_2}." in n and "lora_" in n]  # its pooled output is read
    for component in ("unet", *ENCODERS):  # adapters on the UNet and on both text encoders, every one trained
        lora_b = [n for n in snaps.end[2] if n.startswith(component + ".") and "lora_B" in n]
        assert lora_b and all(n in moved for n in lora_b), component
    saved = load_file(str(run.out / "lora" / "pytorch_lora_weights.safetensors"))
    assert saved and all(v.any() for k, v in saved.items() if "lora_B" in k or "lora.up" in k)  # no all-zero adapter is saved
    assert not [k for k in saved if k.startswith(f"text_encoder.text_model.encoder.layers.{last}.")]


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


@pytest.mark.old_stack  # also run on the oldest supported stack (CI)
def test_generate_end_to_end_through_the_sdxl_pipeline(sdxl_run, invoke, tmp_path):
    run, _ = sdxl_run
    result = invoke("generate", run.out, "a photo of <asset0> at the beach", "--steps", 2, "--num-images", 1,
                    "--scheduler", "euler", "--out-dir", tmp_path / "g", "--lora-scale", 0.5)
    assert result.exit_code == 0, result.output
    (path,) = [tmp_path / "g" / "a-photo-of-asset0-at-the-beach-seed0.png"]
    assert Image.open(path).size == (run.resolution, run.resolution)
    from bas.generation.generate import load_run_pipeline

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


def plain_sdxl(model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_diffusers_export_loads_in_a_plain_sdxl_pipeline_and_changes_its_output(sdxl_run, tiny_sdxl_model, invoke, tmp_path):
    """The export's model card snippet, run as written (tiny model, CPU, 2 steps), in plain diffusers."""
    import re

    run, _ = sdxl_run
    dest = tmp_path / "export"
    result = invoke("export", run.out, "--format", "diffusers", "--out", dest, "--no-preview")
    assert result.exit_code == 0, result.output
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == {
        "README.md", "lora/pytorch_lora_weights.safetensors", "embeddings/asset0.safetensors", "embeddings/asset1.safetensors"}
    card = (dest / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "StableDiffusionXLPipeline" in code and "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2" in code
    plain = plain_sdxl(tiny_sdxl_model)
    prompt = "a photo of <asset0> at the beach"
    before = sample(plain, prompt)
    code = code.replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32").partition("\ngenerator = ")[0]  # up to the sampling
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    pipe = namespace["pipe"]
    handles = load_file(str(run.out / "handles.safetensors"))
    for encoder, tokenizer, prefix in ((pipe.text_encoder, pipe.tokenizer, ""), (pipe.text_encoder_2, pipe.tokenizer_2, "text_encoder_2.")):
        weight = encoder.get_input_embeddings().weight
        for token in ("<asset0>", "<asset1>"):
            assert torch.equal(weight[tokenizer.convert_tokens_to_ids(token)], handles[prefix + token])
    assert not np.allclose(before, sample(pipe, prompt))
    assert "go together" in card and "load both" in card


@pytest.mark.old_stack  # also run on the oldest supported stack (CI)
def test_model_card_code_writes_the_image_bas_generate_writes(sdxl_run, invoke, tmp_path):
    """SDXL's pipeline samples with Euler at guidance 5.0 by default; the card sets bas generate's DDIM and 7.5."""
    run, _ = sdxl_run
    card = exported_card(run.out, invoke, tmp_path)
    assert "DDIMScheduler.from_config" in card.read_text() and "guidance_scale=7.5" in card.read_text()
    check_card_writes_the_generated_image(card, run.out, invoke, tmp_path)


def test_kohya_export_has_sdxl_keys_and_loads_through_diffusers_kohya_loader_with_every_key(sdxl_run, tiny_sdxl_model, invoke, tmp_path):
    import re

    from safetensors import safe_open

    run, _ = sdxl_run
    dest = tmp_path / "kohya"
    result = invoke("export", run.out, "--format", "kohya", "--out", dest, "--name", "toys", "--no-preview")
    assert result.exit_code == 0, result.output
    lora = load_file(str(dest / "toys.safetensors"))
    key = re.compile(r"(lora_unet|lora_te1|lora_te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")
    assert all(key.fullmatch(k) for k in lora), [k for k in lora if not key.fullmatch(k)][:3]
    assert {k.split("_")[1] for k in lora} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in lora)
    with safe_open(str(dest / "toys.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    # diffusers' own kohya converter takes every key (it raises on any it cannot rename) and gives exactly
    # the adapters of the LoRA bas saved: every layer of the UNet and both encoders, none missing
    original, converted = plain_sdxl(tiny_sdxl_model), plain_sdxl(tiny_sdxl_model)
    original.load_lora_weights(str(run.out / "lora"))
    converted.load_lora_weights(str(dest / "toys.safetensors"))
    for component in ("unet", "text_encoder", "text_encoder_2"):
        a = {n: p for n, p in getattr(original, component).named_parameters() if "lora_" in n}
        b = {n: p for n, p in getattr(converted, component).named_parameters() if "lora_" in n}
        assert a.keys() == b.keys() and a, component
        for n in a:  # the same product up @ down (kohya's file folds the scale into lora_up)
            if "lora_A" in n:
                m = n.replace("lora_A", "lora_B")
                torch.testing.assert_close(b[m] @ b[n], a[m] @ a[n], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sample(original, "a photo of a ball"), sample(converted, "a photo of a ball"), atol=1e-5)

    # ComfyUI's key map for SDXL (tests/comfyui_keys.py, from comfy/lora.py): every key of the kohya
    # export and of the run's own diffusers LoRA maps, onto the layer it was trained for, at its strength
    trained = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        params = dict(getattr(original, component).named_parameters())
        for n in params:
            if ".lora_A." in n:
                module = n.split(".lora_A.")[0]
                if component != "unet" and not module.startswith("text_model."):
                    module = "text_model." + module
                trained[(component, module)] = params[n.replace("lora_A", "lora_B")] @ params[n]
    base = plain_sdxl(tiny_sdxl_model)
    names = comfyui_keys.key_map(base.unet, base.text_encoder, base.text_encoder_2)
    for path in (dest / "toys.safetensors", run.out / "lora" / "pytorch_lora_weights.safetensors"):
        changes, left_out = comfyui_keys.load_lora(load_file(str(path)), names)
        assert left_out == [] and changes.keys() == trained.keys(), path.name
        for key, change in changes.items():
            torch.testing.assert_close(change.flatten(1), trained[key].detach().float(), rtol=1e-5, atol=1e-7)

    handles = load_file(str(run.out / "handles.safetensors"))
    for token in ("<asset0>", "<asset1>"):  # AUTOMATIC1111's and ComfyUI's SDXL embedding layout
        emb = load_file(str(dest / "embeddings" / f"toys-{token.strip('<>')}.safetensors"))
        assert set(emb) == {"clip_l", "clip_g"} and emb["clip_l"].shape[0] == emb["clip_g"].shape[0] == 1
        assert torch.equal(emb["clip_l"][0], handles[token]) and torch.equal(emb["clip_g"][0], handles["text_encoder_2." + token])
    card = (dest / "README.md").read_text()
    assert "(SDXL)" in card and "a photo of toys-asset0 at the beach <lora:toys:1>" in card


def test_exports_refuse_what_the_family_cannot_write_and_write_nothing(sdxl_run, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from bas.cli import main
    from bas.exports.export import export_run

    run, _ = sdxl_run

    def refused(argv):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 1 and len(err) == 1 and err[0].startswith("Error: "), err
        return err[0]

    # run.json naming the sd family over an SDXL LoRA: SD 1.x's lora_te_ names have no place for encoder 2
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(run.out, tampered)
    info = json.loads((tampered / "run.json").read_text())
    info.pop("checksums")  # as a run.json of a bas before checksums, which readers cannot check against its files
    (tampered / "run.json").write_text(json.dumps(dict(info, family="sd")))
    handles = load_file(str(tampered / "handles.safetensors"))
    save_file({k: v for k, v in handles.items() if k.startswith("<")}, str(tampered / "handles.safetensors"))
    message = refused(["export", tampered, "--format", "kohya", "--out", tmp_path / "k", "--no-preview"])
    assert "text_encoder_2 layers, which the sd family's kohya names (lora_unet_, lora_te_) have no place for" in message
    assert not (tmp_path / "k").exists()
    # a format the family does not offer
    monkeypatch.setattr(type(run.family), "export_formats", ("diffusers",))
    with pytest.raises(BasError, match="Runs of the sdxl family export as diffusers; --format kohya is not one of them"):
        export_run(run.out, "kohya", tmp_path / "f", preview=False)
    assert not (tmp_path / "f").exists()


def test_full_fine_tune_trains_the_unet_and_both_encoders_and_saves_a_pipeline_plain_diffusers_loads(scene, tiny_sdxl_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from bas.generation.generate import load_run_pipeline

    run, snaps, _ = run_sdxl(scene, tiny_sdxl_model, tmp_path / "out", ["full"], phase1_steps=1, phase2_lr=1e-3)
    moved, handles = changed(snaps, 2), set(handle_names(run).values())
    assert handles <= moved and not any("lora_" in n for n in snaps.end[2])
    for component in ("unet", *ENCODERS):  # the denoiser's weights and both encoders' own weights train
        assert any(n.startswith(component + ".") and n not in handles for n in moved), component
    base_rows = {n for n in snaps.end[2] if n.endswith("token_embedding.base.weight")}
    assert len(base_rows) == 2 and not base_rows & moved  # the old vocabulary of both encoders stays as it was
    assert (run.out / "pipeline" / "model_index.json").is_file() and not (run.out / "lora").exists()

    plain = StableDiffusionXLPipeline.from_pretrained(str(run.out / "pipeline"))
    trained = run.components.denoiser.state_dict()
    loaded = plain.unet.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    saved = load_file(str(run.out / "handles.safetensors"))
    for prefix, encoder, tokenizer in (("", plain.text_encoder, plain.tokenizer), ("text_encoder_2.", plain.text_encoder_2, plain.tokenizer_2)):
        params = dict(encoder.named_parameters())
        name = prefix.rstrip(".") or "text_encoder"
        for n, value in snaps.end[2].items():  # every trained weight of the encoder, as the run left it
            if n.startswith(name + ".") and "token_embedding" not in n:
                assert torch.equal(params[n[len(name) + 1:]], value), n
        weight = encoder.get_input_embeddings().weight
        for token in ("<asset0>", "<asset1>"):
            assert torch.equal(weight[tokenizer.convert_tokens_to_ids(token)], saved[prefix + token])
    pipe, _ = load_run_pipeline(run.out, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.state_dict().items())


def test_prior_preservation_uses_its_class_images_with_their_size_conditioning_in_phase2(scene, tiny_sdxl_model, tmp_path):
    classes = tmp_path / "classes"
    classes.mkdir()
    wide = np.zeros((128, 160, 3), dtype=np.uint8)
    wide[:, :, 0] = np.linspace(0, 255, 160, dtype=np.uint8)
    Image.fromarray(wide).save(classes / "a-wide.png")  # given: 160x128, so its crop starts 16 px from the left
    run, _, calls = run_sdxl(scene, tiny_sdxl_model, tmp_path / "out", ["prior-preservation"], phase2_steps=4,
                             class_data_dir=classes, num_class_images=2, class_generation_steps=2)
    generated = sorted(p.name for p in classes.iterdir())
    assert generated == ["a-wide.png", "class-0001.png"] and Image.open(classes / "class-0001.png").size == (128, 128)
    history = run.info["history"]
    assert all("prior" not in h for h in history["phase1"]) and all(h["prior"] > 0 for h in history["phase2"])
    assert {t["name"] for t in run.info["loss_terms"]} == {"diffusion", "attention", "prior"}
    # phase 1: one forward a step (the scene's); phase 2: the scene's, then the prior's on a class image
    assert [c[0] for c in calls.calls] == [1, 1] + [2] * 8
    scene_ids = [*run.scene.size.original, *run.scene.size.crop_top_left, *run.scene.size.target]
    assert all(c[2] == scene_ids for c in calls.calls[:2] + calls.calls[2::2])
    prior = [c[2] for c in calls.calls[3::2]]
    assert {tuple(ids) for ids in prior} == {(128, 160, 0, 16, 128, 128), (128, 128, 0, 0, 128, 128)}  # both class images drawn
    assert all(c[1] == (1, 4, 16, 16) for c in calls.calls)


def test_a_non_native_resolution_trains_and_generates_at_that_size(scene, tiny_sdxl_model, tmp_path, invoke):
    """As --resolution 768 on SDXL's 1024: the tiny SDXL (native 128 px) at 192 px, another multiple of 64."""
    run, snaps, calls = run_sdxl(scene, tiny_sdxl_model, tmp_path / "out", phase1_steps=1, phase2_steps=1, resolution=192)
    info = json.loads((run.out / "run.json").read_text())
    assert run.resolution == info["resolution"] == 192
    # trained on 24x24 latents, conditioned on a 192 px target, the attention loss's maps at 12x12 (the side nearest the paper's 16)
    assert [c[1] for c in calls.calls] == [(1, 4, 24, 24)] * 2
    assert all(c[2][4:] == [192, 192] for c in calls.calls)
    check_captured_maps(run, snaps, 24, 12)
    result = invoke("generate", run.out, "a photo of <asset0>", "--steps", 2, "--num-images", 1, "--scheduler", "euler",
                    "--out-dir", tmp_path / "g")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "g" / "a-photo-of-asset0-seed0.png").size == (192, 192)
