"""FLUX.1 on a tiny random FLUX pipeline: what each phase trains in CLIP-L and T5, the joint-attention maps,
the flow-matching objective and packed masked loss, generation and editing through diffusers' FluxPipeline,
the exports, and the bad input the family refuses."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import bas
import comfyui_keys
from bas.core.api import make_config
from bas.core.plugins import Plugins
from bas.core.training import extract
from bas.plugins.flux import Flux, image_text_probabilities, pack, shift_sigmas, unpack

from conftest import Snapshots, changed, check_card_writes_the_generated_image, exported_card  # noqa: E402

ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, tiny_flux_model, scene):
    snaps = Snapshots()
    pm = Plugins([], extra=[("snapshots", snaps)])
    out = tmp_path_factory.mktemp("flux") / "run"
    values = {"scene": scene, "model": str(tiny_flux_model), "out": out, "quiet": True, "phase1_steps": 2, "phase2_steps": 2,
              "init_tokens": ["ball", "box"], "gradient_checkpointing": True}  # the capture under recomputation, as on a GPU
    with pytest.warns(UserWarning, match="FLUX runs unquantised on the CPU"):
        run = extract(make_config(pm, values, []), pm)
    return run, snaps


def handle_names(run):
    return {prefix: f"{prefix}.{name}" for prefix, module in run.components.trainable_modules().items()
            for name, p in module.named_parameters() if any(p is e.handles for e in run.handle_embeddings)}


def test_the_family_is_detected_and_recorded(flux_run, tiny_flux_model):
    run, _ = flux_run
    info = json.loads((run.out / "run.json").read_text())
    assert info["family"] == "flux" and info["config"]["family"] is None and info["model"] == str(tiny_flux_model)
    assert info["prediction_type"] == "flow" and info["quantize"] == "none" and info["resolution"] == 128
    assert [e.name for e in run.components.text_encoders] == list(ENCODERS)
    # on CUDA the family picks what fits 12 GB; on the CPU nothing
    assert Flux().memory_defaults(torch.device("cuda"), "lora") == {"gradient_checkpointing": True, "optimizer": "adamw8bit", "quantize": "nf4"}
    assert Flux().memory_defaults(torch.device("cpu"), "lora") == {}


def test_quantised_loading_asks_bitsandbytes_for_the_transformer_and_t5_only(tiny_flux_model, monkeypatch):
    """What ``load`` passes to ``from_pretrained`` for --quantize nf4 and int8 (bitsandbytes needs CUDA to
    load them, so the loading itself runs unquantised here)."""
    import diffusers
    import transformers

    from bas.core.family import LoadPlan

    seen = {}
    for library, cls in ((diffusers, "FluxTransformer2DModel"), (transformers, "T5EncoderModel"), (transformers, "CLIPTextModel"),
                         (diffusers, "AutoencoderKL")):
        original = getattr(library, cls).from_pretrained.__func__

        def record(klass, model, original=original, cls=cls, **kwargs):
            seen[cls] = kwargs
            return original(klass, model, **{k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")})
        monkeypatch.setattr(getattr(library, cls), "from_pretrained", classmethod(record))
    for quantize in ("nf4", "int8"):
        Flux().load(str(tiny_flux_model), LoadPlan(torch.device("cpu"), torch.bfloat16, quantize))
        transformer, t5 = seen["FluxTransformer2DModel"]["quantization_config"], seen["T5EncoderModel"]["quantization_config"]
        assert isinstance(transformer, diffusers.BitsAndBytesConfig) and isinstance(t5, transformers.BitsAndBytesConfig)
        for config in (transformer, t5):
            if quantize == "nf4":
                assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.bfloat16
            else:
                assert config.load_in_8bit and not config.load_in_4bit
        assert seen["T5EncoderModel"]["device_map"] == seen["FluxTransformer2DModel"]["device_map"] == {"": torch.device("cpu")}
        assert "quantization_config" not in seen["CLIPTextModel"] and "quantization_config" not in seen["AutoencoderKL"]
        assert seen["CLIPTextModel"]["dtype"] == torch.bfloat16 and "dtype" not in seen["AutoencoderKL"]  # the VAE encodes in fp32


def test_prior_preservation_reuses_t5_states_of_the_class_prompt(tiny_flux_model, scene, tmp_path):
    """Class images come from FluxPipeline with the flow-matching sampler; the class prompt holds no handle,
    so in phase 2 T5 encodes it once (T5 trains only its handle rows) and each step's handle prompt anew."""
    calls = []

    class T5Calls:
        def on_phase_start(self, run, phase):
            if phase == 2:
                run.components.text_encoders[1].model.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0][0].tolist())))

        @bas.hookimpl
        def bas_register_observers(self, register):
            register("t5-calls", lambda config: self)

    pm = Plugins(["prior-preservation"], extra=[("t5-calls", T5Calls())])
    values = {"scene": scene, "model": str(tiny_flux_model), "out": tmp_path / "run", "quiet": True, "phase1_steps": 1, "phase2_steps": 3,
              "num_class_images": 1, "class_generation_steps": 2, "class_prompt": "a photo at the beach"}
    with pytest.warns(UserWarning, match="FLUX runs unquantised"):
        run = extract(make_config(pm, values, ["prior-preservation"]), pm)
    class_ids = tuple(run.tokenize(["a photo at the beach"])[1][0].tolist())
    first = run.handle_embeddings[1].first_id
    others = [c for c in calls if c != class_ids]
    assert calls.count(class_ids) == 1 and len(others) >= 3  # each step's handle prompt (and the report's), the class prompt once
    assert all(any(first <= i < first + 2 for i in ids) for ids in others)
    assert all(step["prior"] > 0 for step in run.info["history"]["phase2"])


def test_phase2_t5_states_are_the_inference_states_t5_stays_in_eval_mode(tiny_flux_model, scene, tmp_path):
    """T5 trains only its handle rows, so phase 2 runs it as inference does (eval mode, no dropout):
    its states, and those FLUX caches for a prompt without handles (the class prompt), are the
    inference states; CLIP, which trains LoRA, is in train mode."""
    prompt = "a photo at the beach"

    class T5States:
        def on_phase_start(self, run, phase):
            if phase == 2:
                t5 = run.components.text_encoders[1]
                self.training = [e.model.training for e in run.components.text_encoders]
                with torch.no_grad():
                    ids = run.tokenize([prompt])[1]
                    self.direct = t5.model(ids)[0].clone()
                    self.cached = run.family.t5_states(t5, ids).clone()

        @bas.hookimpl
        def bas_register_observers(self, register):
            register("t5-states", lambda config: self)

    seen = T5States()
    pm = Plugins([], extra=[("t5-states", seen)])
    values = {"scene": scene, "model": str(tiny_flux_model), "out": tmp_path / "run", "quiet": True, "phase1_steps": 1, "phase2_steps": 1}
    with pytest.warns(UserWarning, match="FLUX runs unquantised"):
        run = extract(make_config(pm, values, []), pm)
    t5 = run.components.text_encoders[1]
    assert t5.model.config.dropout_rate > 0  # what train mode would apply
    assert seen.training == [True, False]
    with torch.no_grad():
        inference = t5.model.eval()(run.tokenize([prompt])[1])[0]
    assert torch.equal(seen.direct, inference) and torch.equal(seen.cached, inference)


def test_phase1_changes_only_the_handle_rows_of_clip_and_t5(flux_run):
    run, snaps = flux_run
    handles = handle_names(run)
    assert set(handles) == set(ENCODERS)
    assert changed(snaps, 1) == set(handles.values())
    clip, t5 = run.handle_embeddings
    # CLIP's handles follow its vocabulary; T5's take the ids its tokenizer gives, inside the padded matrix
    assert clip.first_id == clip.num_base and t5.first_id + 2 <= t5.num_base
    tokenizer_2 = run.components.text_encoders[1].tokenizer
    assert tokenizer_2.convert_tokens_to_ids(run.tokens) == list(range(t5.first_id, t5.first_id + 2))
    full = t5.weight.detach()
    assert full.shape[0] == t5.num_base
    others = torch.ones(full.shape[0], dtype=torch.bool)
    others[t5.first_id: t5.first_id + 2] = False
    assert torch.equal(full[others], t5.base.weight[others]) and torch.equal(full[~others], t5.handles.detach())


def test_phase2_lora_changes_only_lora_parameters_and_handle_rows(flux_run):
    run, snaps = flux_run
    moved = changed(snaps, 2)
    handles = set(handle_names(run).values())
    assert handles <= moved
    others = moved - handles
    assert others and all("lora_" in n for n in others)
    lora_b = {n for n in snaps.end[2] if "lora_B" in n}
    assert lora_b <= moved  # every adapter trained
    modules = {n.split(".lora_B")[0] for n in lora_b}
    for kind in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "ff_context.net.2"):
        assert f"transformer.transformer_blocks.0.{kind}" in modules
    for kind in ("attn.to_v", "proj_mlp", "proj_out"):
        assert f"transformer.single_transformer_blocks.1.{kind}" in modules
    assert "transformer.proj_out" not in modules  # the model's own output projection stays out
    assert any(m.startswith("text_encoder.") for m in modules) and not any(m.startswith("text_encoder_2.") for m in modules)


def test_conditioning_is_t5_states_and_clip_pooled_at_the_end_of_text(flux_run):
    run, _ = flux_run
    clip, t5 = run.components.text_encoders
    ids = run.tokenize(["a photo of <asset0> and <asset1>"])
    assert ids[1].shape[1] == 512  # T5's sequence as FluxPipeline pads it
    with torch.no_grad():
        cond = run.conditioning(ids)
        torch.testing.assert_close(cond.hidden_states, t5.model(ids[1])[0])
        last = clip.model(ids[0]).last_hidden_state[0]
    eos = (ids[0][0] == clip.tokenizer.eos_token_id).nonzero()[0, 0]
    handle = int(ids[0][0].argmax())
    assert int(ids[0][0][handle]) >= run.handle_embeddings[0].first_id  # the highest id, which the legacy config pools, is a handle
    torch.testing.assert_close(cond.extra["pooled_projections"][0], last[eos])
    # a prompt without handles: T5's states are computed once and reused (T5 trains nothing else)
    plain = run.tokenize(["a photo at the beach"])
    first = run.conditioning(plain).hidden_states
    assert run.conditioning(plain).hidden_states is first and not first.requires_grad
    torch.testing.assert_close(first, t5.model(plain[1])[0].detach())


def test_joint_attention_maps_are_the_softmax_probabilities_of_the_handle_tokens(flux_run):
    """The capture processor's maps equal the image queries' explicit softmax over the whole joint
    sequence (text first) at the text keys, renormalised over the text keys per head, and installing
    it leaves the transformer's output as it was."""
    from bas.core.attention import AttentionStore
    from bas.plugins.attention_loss import loss_layers

    run, _ = flux_run
    c, family = run.components, run.family
    res, chosen = loss_layers(run)
    assert res == 8 and {side for _, side in chosen.values()} == {8}  # the 8x8 packed grid as it is: the default aims at 16x16
    assert sorted(chosen) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    ids = run.tokenize([run.prompt_for([0, 1])])
    positions = run.token_positions(ids, [0, 1])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([600.0])

    explicit = {}

    def reference(name):
        def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            from diffusers.models.embeddings import apply_rotary_emb

            def heads(x):
                return x.unflatten(-1, (-1, attn.head_dim))

            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), attn.norm_q(heads(attn.to_q(hidden_states)))], 1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states)))], 1)
            v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), heads(attn.to_v(hidden_states))], 1)
            q, k = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1), apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            probs = ((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / attn.head_dim ** 0.5).softmax(-1)  # (B, H, L, L)
            text = encoder_hidden_states.shape[1]
            explicit[name] = probs
            out = (probs @ v.transpose(1, 2)).transpose(1, 2).flatten(2)
            return attn.to_out[0](out[:, text:]), attn.to_add_out(out[:, :text])
        return processor

    with torch.no_grad():
        cond = run.conditioning(ids)
        fused = family.predict(c.denoiser, latents, t, cond)
        store = AttentionStore(without_grad=True)
        store.forwards.append((None, []))
        capture = family.capture_processor(store)
        previous = {n: m.processor for n, (m, _) in chosen.items()}
        try:
            for m, _ in chosen.values():
                m.set_processor(capture)
            captured_out = family.predict(c.denoiser, latents, t, cond)
            for n, (m, _) in chosen.items():
                m.set_processor(reference(n))
            explicit_out = family.predict(c.denoiser, latents, t, cond)
        finally:
            for n, (m, _) in chosen.items():
                m.set_processor(previous[n])
    torch.testing.assert_close(captured_out, fused, rtol=0, atol=0)  # capturing changes nothing the model computes
    torch.testing.assert_close(explicit_out, fused, rtol=1e-4, atol=1e-5)  # the reference is the model's attention
    maps = store.forwards[0][1]
    text = cond.hidden_states.shape[1]
    assert len(maps) == 2 and maps[0].shape == (1, 64, text) and maps[0].dtype == torch.float32
    for name, captured in zip(sorted(chosen), maps):
        full = explicit[name][:, :, text:]  # image queries over every key
        on_text = full[..., :text]
        torch.testing.assert_close(captured, (on_text / on_text.sum(-1, keepdim=True)).mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full.sum(-1), torch.ones_like(full.sum(-1)))
        torch.testing.assert_close(captured.sum(-1), torch.ones_like(captured.sum(-1)))  # a distribution over the text per position
        assert on_text.sum(-1).std() > 0.01  # the text's share of each query's attention varies: unnormalised, it would scale the map
        handle = captured[0][:, positions]
        assert (handle > 0).all() and (handle < 1).all()
    # the function the processor calls, on its own: probabilities of a random joint sequence
    q, k = torch.randn(2, 7, 3, 4), torch.randn(2, 7, 3, 4)
    p = image_text_probabilities(q, k, 3)
    joint = ((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / 2).softmax(-1)[:, :, 3:, :3]
    torch.testing.assert_close(p, (joint / joint.sum(-1, keepdim=True)).mean(1))
    # an image key that draws a query's attention away from the text leaves its map as it was
    far = k.clone()
    far[:, 5] = q[:, 4] * 50
    assert image_text_probabilities(q, far, 3)[:, 1:].sum(-1).allclose(torch.ones(2, 3))
    torch.testing.assert_close(image_text_probabilities(q, far, 3), p)


def test_the_flow_matching_objective_and_its_shifted_timesteps(flux_run):
    run, _ = flux_run
    family, sched = run.family, run.components.noise_scheduler
    latents = torch.randn(3, 4, 16, 16)
    noise, t, noisy, target = family.training_noise(sched, latents, torch.Generator().manual_seed(0))
    s = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * latents + s * noise)
    torch.testing.assert_close(target, noise - latents)
    generator = torch.Generator().manual_seed(0)
    torch.randn(latents.shape, generator=generator)
    u = torch.sigmoid(torch.randn((3,), generator=generator))
    torch.testing.assert_close(t / 1000, shift_sigmas(sched.config, u, 64))
    # the resolution-dependent shift moves more of training to high noise for larger images, as FLUX samples
    uniform = torch.linspace(0.05, 0.95, 10)
    assert (shift_sigmas(sched.config, uniform, 4096) > shift_sigmas(sched.config, uniform, 256)).all()
    assert (shift_sigmas(sched.config, uniform, 1024) > uniform).all()


def test_the_masked_loss_ignores_packed_tokens_outside_the_masks():
    """The transformer sees 2x2 patches as tokens; a change of its prediction in a token whose patch
    lies outside the masks leaves the loss as it was, one inside changes it."""
    from bas.core.components import StepBatch
    from bas.plugins.masked_loss import MaskedDiffusionLoss

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 4, 16, 16, generator=gen)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:80, 48:96] = 1.0  # image pixels 32..79 x 48..95: latent cells 4..9 x 6..11: tokens rows 2..4, columns 3..5
    covered = pack(torch.nn.functional.interpolate(mask, size=(16, 16), mode="area").expand(1, 4, 16, 16))[0].amax(-1) > 0
    assert covered.sum() == 9

    def loss(p):
        batch = StepBatch(step=1, phase=1, concepts=[0], prompt="", latents=p, noise=p, timesteps=torch.zeros(1), noisy_latents=p,
                          target=target, model_pred=p, masks=mask, union_mask=mask, token_positions=[0], conditioning=None)
        return MaskedDiffusionLoss(type("C", (), {"options": {}})())(batch)

    base = loss(pred)
    tokens = pack(pred)
    outside, inside = tokens.clone(), tokens.clone()
    outside[0, ~covered] += 5.0
    inside[0, covered.nonzero()[0, 0]] += 5.0
    assert torch.equal(loss(unpack(outside, 16, 16)), base)
    assert loss(unpack(inside, 16, 16)) > base


@pytest.mark.old_stack  # also run on the oldest supported stack (CI)
def test_generate_and_edit_end_to_end_through_the_flux_pipeline(flux_run, scene, invoke, tmp_path):
    run, _ = flux_run
    result = invoke("generate", run.out, "a photo of <asset0> at the beach", "--steps", 2, "--num-images", 1, "--out-dir", tmp_path / "g",
                    "--lora-scale", 0.5)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "g" / "a-photo-of-asset0-at-the-beach-seed0.png").size == (128, 128)
    from bas.generation.generate import load_run_pipeline

    pipe, _ = load_run_pipeline(run.out, device="cpu")
    assert type(pipe).__name__ == "FluxPipeline" and any(pipe.get_list_adapters().values())
    assert getattr(pipe.text_encoder, "text_model", pipe.text_encoder).eos_token_id == pipe.tokenizer.eos_token_id  # pools the prompt's end
    handles = load_file(str(run.out / "handles.safetensors"))
    for encoder, tokenizer, prefix in ((pipe.text_encoder, pipe.tokenizer, ""), (pipe.text_encoder_2, pipe.tokenizer_2, "text_encoder_2.")):
        weight = encoder.get_input_embeddings().weight
        for token in ("<asset0>", "<asset1>"):
            assert torch.equal(weight[tokenizer.convert_tokens_to_ids(token)], handles[prefix + token])
    assert pipe.text_encoder_2.get_input_embeddings().num_embeddings == run.handle_embeddings[1].num_base  # T5's padding kept

    from PIL import ImageDraw

    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((40, 40, 89, 89), fill=255)
    mask.save(tmp_path / "mask.png")
    result = invoke("edit", run.out, "a photo of <asset0>", "--image", scene / "img.png", "--mask", tmp_path / "mask.png",
                    "--steps", 4, "--composite", "--out-dir", tmp_path / "e")
    assert result.exit_code == 0, result.output
    edited = np.asarray(Image.open(tmp_path / "e" / "edit-a-photo-of-asset0-seed0.png").convert("RGB"), dtype=np.float32)
    source = np.asarray(Image.open(scene / "img.png").convert("RGB"), dtype=np.float32)
    inside = np.asarray(mask) > 127
    assert np.abs(edited - source)[inside].mean() > 20 and np.abs(edited - source)[~inside].max() <= 1


def plain_flux(model):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, height=128, width=128, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_diffusers_export_loads_in_a_plain_flux_pipeline_and_changes_its_output(flux_run, tiny_flux_model, invoke, tmp_path):
    """The export's model card code, run as written (tiny model, CPU, 2 steps), in plain diffusers: the LoRA by
    load_lora_weights, CLIP-L's rows by load_textual_inversion, T5's by the card's few lines."""
    run, _ = flux_run
    dest = tmp_path / "export"
    result = invoke("export", run.out, "--format", "diffusers", "--out", dest, "--no-preview")
    assert result.exit_code == 0, result.output
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == {
        "README.md", "lora/pytorch_lora_weights.safetensors", "embeddings/asset0.safetensors", "embeddings/asset1.safetensors"}
    embedding = load_file(str(dest / "embeddings" / "asset0.safetensors"))
    assert set(embedding) == {"clip_l", "t5xxl"} and embedding["clip_l"].shape == (1, 32) and embedding["t5xxl"].shape == (1, 32)
    card = (dest / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "FluxPipeline" in code and "load_lora_weights" in code and "load_textual_inversion" in code
    plain = plain_flux(tiny_flux_model)
    prompt = "a photo of <asset0> at the beach"
    before = sample(plain, prompt)
    code = code.replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32").partition("\ngenerator = ")[0]  # up to the sampling
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    pipe = namespace["pipe"]
    pipe.set_progress_bar_config(disable=True)
    handles = load_file(str(run.out / "handles.safetensors"))
    for encoder, tokenizer, prefix in ((pipe.text_encoder, pipe.tokenizer, ""), (pipe.text_encoder_2, pipe.tokenizer_2, "text_encoder_2.")):
        weight = encoder.get_input_embeddings().weight
        for token in ("<asset0>", "<asset1>"):
            assert torch.equal(weight[tokenizer.convert_tokens_to_ids(token)], handles[prefix + token])
    after = sample(pipe, prompt)
    assert not np.allclose(before, after)
    # the same as bas's own generation from the run
    from bas.generation.generate import load_run_pipeline

    ours, _ = load_run_pipeline(run.out, device="cpu")
    ours.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample(ours, prompt), after, atol=1e-5)


@pytest.mark.old_stack  # also run on the oldest supported stack (CI)
def test_model_card_code_writes_the_image_bas_generate_writes(flux_run, invoke, tmp_path):
    """FluxPipeline samples 28 steps by default; the card sets bas generate's 50, its guidance and the run's size."""
    run, _ = flux_run
    card = exported_card(run.out, invoke, tmp_path)
    assert "num_inference_steps=50," in card.read_text() and "guidance_scale=3.5" in card.read_text()
    check_card_writes_the_generated_image(card, run.out, invoke, tmp_path)


def converted_by_diffusers(state_dict, transformer):
    """diffusers' kohya FLUX converter (``_convert_kohya_flux_lora_to_diffusers``) as it is, except the widths
    of a single block's fused linear1 it assumes (FLUX.1's 3072 and 12288), set to the tiny model's."""
    import inspect

    from diffusers.loaders import lora_conversion_utils as conversion

    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    source = inspect.getsource(conversion._convert_kohya_flux_lora_to_diffusers)
    assert "dims=[3072, 3072, 3072, 12288]" in source
    namespace = dict(vars(conversion))
    exec(source.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{hidden}, {hidden}, {hidden}, {4 * hidden}]"), namespace)
    return namespace["_convert_kohya_flux_lora_to_diffusers"]({k: v.clone() for k, v in state_dict.items()})  # it scales some in place


def test_kohya_export_has_bfl_names_and_loads_through_diffusers_and_comfyui_key_maps(flux_run, tiny_flux_model, invoke, tmp_path, caplog):
    from safetensors import safe_open

    run, _ = flux_run
    dest = tmp_path / "kohya"
    result = invoke("export", run.out, "--format", "kohya", "--out", dest, "--name", "toys", "--no-preview")
    assert result.exit_code == 0, result.output
    lora = load_file(str(dest / "toys.safetensors"))
    key = re.compile(r"(lora_unet_(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2)|single_blocks_\d+_linear[12])"
                     r"|lora_te1_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj)\.(lora_down\.weight|lora_up\.weight|alpha)")
    assert all(key.fullmatch(k) for k in lora), [k for k in lora if not key.fullmatch(k)][:3]
    hidden = 32
    assert lora["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * hidden, 32)  # q, k, v, mlp: 4 x rank 8
    assert lora["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"].shape == (24, hidden)
    with safe_open(str(dest / "toys.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    # the run's rank (8), not the fused layers' (32); every key's alpha is the header's
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert {float(v) for k, v in lora.items() if k.endswith(".alpha")} == {8.0}

    # diffusers' kohya converter splits every fused layer back into the adapters bas trained
    original, converted = plain_flux(tiny_flux_model), plain_flux(tiny_flux_model)
    original.load_lora_weights(str(run.out / "lora"))
    with caplog.at_level("WARNING"):
        converted.load_lora_weights(converted_by_diffusers(lora, converted.transformer))
    assert "Unsupported keys" not in caplog.text
    for component in ("transformer", "text_encoder"):
        a = {n: p for n, p in getattr(original, component).named_parameters() if "lora_" in n}
        b = {n: p for n, p in getattr(converted, component).named_parameters() if "lora_" in n}
        assert a.keys() == b.keys() and a, component
        for n in a:
            if "lora_A" in n:
                m = n.replace("lora_A", "lora_B")
                torch.testing.assert_close(b[m] @ b[n], a[m] @ a[n], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sample(original, "a photo of a ball"), sample(converted, "a photo of a ball"), atol=1e-5)

    # ComfyUI's key map for FLUX: every key of both files loads, and both give the same change to every
    # weight in BFL's layout (the diffusers file's q/k/v into slices of the fused weights)
    base = plain_flux(tiny_flux_model)
    names = comfyui_keys.flux_key_map(base.transformer, base.text_encoder)
    kohya_changes, left_out = comfyui_keys.load_flux_lora(lora, names)
    assert left_out == []
    diffusers_changes, left_out = comfyui_keys.load_flux_lora(load_file(str(run.out / "lora" / "pytorch_lora_weights.safetensors")), names)
    assert left_out == [] and kohya_changes.keys() == diffusers_changes.keys()
    for weight, change in kohya_changes.items():
        torch.testing.assert_close(change, diffusers_changes[weight], rtol=1e-5, atol=1e-7)

    handles = load_file(str(run.out / "handles.safetensors"))
    emb = load_file(str(dest / "embeddings" / "toys-asset1.safetensors"))  # ComfyUI's FLUX embedding layout
    assert torch.equal(emb["clip_l"][0], handles["<asset1>"]) and torch.equal(emb["t5xxl"][0], handles["text_encoder_2.<asset1>"])
    assert "(FLUX.1 dev)" in (dest / "README.md").read_text()


def refused(capsys, argv):
    from bas.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Warning: ")]
    assert exc.value.code == 1 and len(err) == 1 and err[0].startswith("Error: "), err
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["--plugin", "full"], "FLUX trains LoRA only"),
    (["--resolution", "120"], "--resolution must be a multiple of 16 for flux models (such as 128), not 120"),
    (["--optimizer", "adamw8bit"], "--optimizer adamw8bit needs a CUDA GPU; use --optimizer adamw on the CPU"),
    (["--quantize", "nf4"], "--quantize nf4 needs a CUDA GPU (bitsandbytes' quantised layers); use --quantize none on the CPU"),
    (["--attention-res", "3"], "--attention-res 3 does not divide the 8x8 grid of FLUX's packed tokens"),
])
def test_flux_bad_input_is_one_line_and_nothing_is_written(args, message, scene, tiny_flux_model, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused(capsys, ["run", "--scene", scene, "--model", tiny_flux_model, "--out", out, "--quiet", "--phase1-steps", 1,
                            "--phase2-steps", 1, *args])
    assert message in line, line
    assert not out.exists()


def test_flux_sampling_and_export_bad_input(flux_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    run, _ = flux_run
    assert "--negative-prompt has no effect" in refused(capsys, ["generate", run.out, "a photo of <asset0>", "--negative-prompt", "blurry"])
    assert "--scheduler ddim does not sample flux models; use flow-euler" in refused(capsys, ["generate", run.out, "a photo", "--scheduler", "ddim"])
    # a FLUX LoRA exported under an SD name scheme (run.json naming the sd family)
    tampered = tmp_path / "tampered"
    shutil.copytree(run.out, tampered)
    info = json.loads((tampered / "run.json").read_text())
    info.pop("checksums")
    (tampered / "run.json").write_text(json.dumps(dict(info, family="sd")))
    handles = load_file(str(tampered / "handles.safetensors"))
    save_file({k: v for k, v in handles.items() if k.startswith("<")}, str(tampered / "handles.safetensors"))
    message = refused(capsys, ["export", tampered, "--format", "kohya", "--out", tmp_path / "k", "--no-preview"])
    assert "transformer layers, which the sd family's kohya names (lora_unet_, lora_te_) have no place for" in message
    assert not (tmp_path / "k").exists()


# -- guidance: dev's distilled embedding gets 3.5 in training, schnell has none ------------------------------------------
def record_guidance(monkeypatch) -> list:
    """Every ``guidance`` the FLUX transformer is called with from now on (None where none is passed), checked
    to hold one value per image of the batch."""
    from diffusers import FluxTransformer2DModel

    seen, real = [], FluxTransformer2DModel.forward

    def forward(self, *args, guidance=None, **kwargs):
        if guidance is not None and guidance.shape != (kwargs["hidden_states"].shape[0],):
            seen.append(f"guidance of shape {tuple(guidance.shape)} for a batch of {kwargs['hidden_states'].shape[0]}")
        else:
            seen.append(None if guidance is None else guidance.detach().clone())
        return real(self, *args, guidance=guidance, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", forward)
    return seen


def quick_extract(model, scene, out, **values):
    pm = Plugins([])
    values = {"scene": scene, "model": str(model), "out": out, "quiet": True, "phase1_steps": 1, "phase2_steps": 1,
              "init_tokens": ["ball", "box"], **values}
    with pytest.warns(UserWarning, match="FLUX runs unquantised on the CPU"):
        return extract(make_config(pm, values, []), pm)


@pytest.fixture(scope="module")
def tiny_schnell_model(tmp_path_factory):
    """A tiny FLUX.1-schnell: no guidance embedding, and schnell's scheduler (a fixed shift of 1, no dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from bas.exports.formats import save_pipeline
    from bas.plugins.flux import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(seed=0, guidance_embeds=False)
    pipe.register_modules(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                                                                    base_image_seq_len=256, max_image_seq_len=4096))
    out = tmp_path_factory.mktemp("models") / "tiny-flux-schnell"
    save_pipeline(pipe, out)
    return out


def test_training_passes_guidance_35_to_a_guidance_distilled_transformer_as_diffusers_flux_dreambooth(tiny_flux_model, scene, tmp_path,
                                                                                                       monkeypatch):
    """diffusers' train_dreambooth_lora_flux.py: ``guidance = [args.guidance_scale (3.5)] * batch`` when the
    transformer's config has ``guidance_embeds`` (dev), else ``None``."""
    from bas.plugins.flux import TRAINING_GUIDANCE

    seen = record_guidance(monkeypatch)
    quick_extract(tiny_flux_model, scene, tmp_path / "run")
    assert TRAINING_GUIDANCE == 3.5 and len(seen) >= 2  # a step in each phase
    for g in seen:  # one value per image of the batch
        assert isinstance(g, torch.Tensor) and g.dtype == torch.float32 and torch.equal(g, torch.full_like(g, 3.5)), g


def test_flux_schnell_trains_without_guidance_and_generates_in_few_steps(tiny_schnell_model, scene, tmp_path, invoke, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    seen = record_guidance(monkeypatch)
    run = quick_extract(tiny_schnell_model, scene, tmp_path / "run")
    info = json.loads((run.out / "run.json").read_text())
    assert info["family"] == "flux" and info["prediction_type"] == "flow"
    assert not run.components.denoiser.config.guidance_embeds
    assert len(seen) >= 2 and all(g is None for g in seen)  # schnell has no guidance embedding to feed
    # schnell's scheduler does not shift: training draws s = sigmoid(normal), whatever the image size
    sched = run.components.noise_scheduler
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler) and not sched.config.use_dynamic_shifting
    gen = torch.Generator().manual_seed(0)
    _, t, _, _ = run.family.training_noise(sched, torch.randn(3, 4, 16, 16), gen)
    gen = torch.Generator().manual_seed(0)
    torch.randn((3, 4, 16, 16), generator=gen)
    torch.testing.assert_close(t / 1000, torch.sigmoid(torch.randn((3,), generator=gen)))

    seen.clear()
    prompt = "a photo of <asset0> at the beach"
    result = invoke("generate", run.out, prompt, "--steps", 4, "--num-images", 1, "--out-dir", tmp_path / "g")  # schnell's 4 steps
    assert result.exit_code == 0, result.output
    assert len(seen) == 4 and all(g is None for g in seen)  # one pass per step, no guidance
    image = np.asarray(Image.open(tmp_path / "g" / "a-photo-of-asset0-at-the-beach-seed0.png"))
    assert image.shape == (128, 128, 3) and image.std() > 0
    result = invoke("generate", run.out, prompt, "--steps", 4, "--num-images", 1, "--guidance", 0, "--out-dir", tmp_path / "g0")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g0" / "a-photo-of-asset0-at-the-beach-seed0.png")), image)  # ignored
    # without --steps: schnell's 4, as its model card says (not the paper's 50), the same image
    seen.clear()
    result = invoke("generate", run.out, prompt, "--num-images", 1, "--out-dir", tmp_path / "default")
    assert result.exit_code == 0, result.output
    assert len(seen) == 4
    assert np.array_equal(np.asarray(Image.open(tmp_path / "default" / "a-photo-of-asset0-at-the-beach-seed0.png")), image)


def test_sampling_defaults_are_the_variants_schnell_4_steps_and_guidance_0_dev_50_and_3_5(tiny_flux_model, tiny_schnell_model):
    """Told from the base model's transformer config (guidance_embeds) without loading it, or, for a
    hub id that is not cached, from its name; what the user gives wins."""
    from bas.generation.generate import run_sampling_defaults
    from bas.plugins.flux import Flux

    flux = Flux()
    assert run_sampling_defaults(flux, {"model": str(tiny_schnell_model)}, None, None, None) == ("flow-euler", 0.0, 4)
    assert run_sampling_defaults(flux, {"model": str(tiny_flux_model)}, None, None, None) == ("flow-euler", 3.5, 50)
    assert run_sampling_defaults(flux, {"model": "black-forest-labs/FLUX.1-schnell"}, None, None, None) == ("flow-euler", 0.0, 4)
    assert run_sampling_defaults(flux, {"model": "black-forest-labs/FLUX.1-dev"}, None, None, None) == ("flow-euler", 3.5, 50)
    assert run_sampling_defaults(flux, {"model": str(tiny_schnell_model)}, None, 2.0, 8) == ("flow-euler", 2.0, 8)


def test_dev_samples_with_its_guidance_embedding(flux_run, tmp_path, invoke, monkeypatch):
    run, _ = flux_run
    seen = record_guidance(monkeypatch)
    images = []
    for extra in ([], ["--guidance", 0]):
        seen.clear()
        out = tmp_path / f"g{len(images)}"
        result = invoke("generate", run.out, "a photo of <asset0>", "--steps", 2, "--num-images", 1, "--out-dir", out, *extra)
        assert result.exit_code == 0, result.output
        assert len(seen) == 2 and all(isinstance(g, torch.Tensor) and torch.equal(g, torch.full_like(g, 0.0 if extra else 3.5)) for g in seen)
        images.append(np.asarray(Image.open(out / "a-photo-of-asset0-seed0.png")))
    assert not np.array_equal(*images)  # dev's guidance changes the image, schnell's absence of it does not


@pytest.mark.old_stack  # also run on the oldest supported stack (CI), with the oldest bitsandbytes of pyproject's range
def test_the_installed_bitsandbytes_offers_what_bas_calls():
    """pyproject's bitsandbytes range, checked at both ends where no GPU is: the library imports, offers
    the 8-bit AdamW, and diffusers' and transformers' quantisation configs take bas's nf4 and int8
    arguments (the CUDA paths themselves run only on a GPU)."""
    import diffusers

    from bas.plugins.adamw import _bitsandbytes
    from bas.plugins.flux import Flux

    assert callable(_bitsandbytes().optim.AdamW8bit) and hasattr(diffusers, "PipelineQuantizationConfig")
    for library in ("diffusers", "transformers"):
        nf4 = Flux.quantization(library, "nf4", torch.bfloat16)
        assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_compute_dtype == torch.bfloat16, library
        assert Flux.quantization(library, "int8", torch.bfloat16).load_in_8bit, library
