"""The file layouts older and other loaders need (diffusers 0.2x-0.3x with transformers 4.x, kohya,
AUTOMATIC1111, ComfyUI), checked in this project's stack by what those loaders read.

The same files were loaded in diffusers 0.30.3 / transformers 4.44.2 / peft 0.12.0 and diffusers
0.32.2 / transformers 4.48.3 / peft 0.14.0 (docs/outputs.md, "Checked against the loaders", ``tools/old_stack_check.py``) and
through ComfyUI's own loaders (``tools/comfyui_check.py``); these tests keep the names and files those
versions need from changing unnoticed, ComfyUI's and AUTOMATIC1111's rules included (``comfyui_keys``,
``a1111_keys``).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bas.exports.export import kohya_metadata, low_rank_difference
from bas.core.family import Components
from bas.exports.formats import (LoraLayer, diffusers_state_dict, kohya_targets, read_diffusers_lora, standard_module,
                              write_diffusers_lora, write_kohya_lora)
from bas.plugins.sd import StableDiffusion

import comfyui_keys

# The UNet as diffusers' attention processors named it (to_q/to_k/to_v/to_out, the rest .lora.down/.lora.up),
# the text encoder with peft's names on transformers 4's path.
DIFFUSERS_KEY = re.compile(r"unet\.(down_blocks|mid_block|up_blocks)\.[\w.]+\.attn[12]\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight"
                           r"|unet\.(down_blocks|mid_block|up_blocks)\.[\w.]+\.lora\.(down|up)\.weight"
                           r"|text_encoder\.text_model\.encoder\.layers\.\d+\.[\w.]+\.lora_[AB]\.weight")


def plain_pipeline(model, unet=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    if unet is not None:
        pipe = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def outputs(pipe):
    ids = pipe.tokenizer(["a photo of a red ball", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids)[0]
    c = pipe.unet.config
    latents = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(0))
    return hidden, pipe.unet(latents, torch.tensor([500, 20]), encoder_hidden_states=hidden).sample


def trained_changes(pipe, scale):
    """``{(component, module): scale * B @ A}`` of the peft adapters in ``pipe``, modules named as in the files."""
    from peft.utils import get_peft_model_state_dict

    changes = {}
    for component in ("unet", "text_encoder"):
        sd = get_peft_model_state_dict(getattr(pipe, component))
        for key, down in sd.items():
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                changes[(component, standard_module(component, module))] = scale * sd[f"{module}.lora_B.weight"] @ down
    return changes


def assert_comfyui_applies(lora, unet, text_encoder, want, atol=1e-6):
    """ComfyUI's key map (comfyui_keys) loads every key of ``lora`` and changes exactly the layers in ``want``
    by ``want[layer]``."""
    got, left_out = comfyui_keys.load_lora(lora, comfyui_keys.key_map(unet, text_encoder))
    assert left_out == []
    assert got.keys() == want.keys()
    worst = max(float((got[k] - w.reshape(got[k].shape)).abs().max()) for k, w in want.items())
    assert worst < atol


def test_run_lora_file_has_the_standard_layout_and_loads_at_its_trained_scale(tiny_model, tmp_path):
    """lora/ as `bas run` saves it: the UNet in diffusers' attention-processor names, the text encoder
    in peft's on transformers 4's path, one rank, no peft config in the header; loaded by diffusers,
    and by ComfyUI's key map, it gives exactly the adapter trained in memory, alpha != rank included."""
    from bas.plugins.lora import Lora

    pipe = plain_pipeline(tiny_model)
    strategy = Lora(SimpleNamespace(options={"lora_rank": 4, "lora_alpha": 2.0}))  # scale 0.5
    family = StableDiffusion()
    parts = Components(family, family.pipeline_text_encoders(pipe), pipe.unet, pipe.vae, pipe.scheduler)
    run = SimpleNamespace(family=family, components=parts, device="cpu")
    params = strategy.prepare(run)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * 0.1)
    trained = outputs(pipe)
    assert strategy.save(run, tmp_path) == ["lora/pytorch_lora_weights.safetensors"]

    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    sd = load_file(str(path))
    assert [k for k in sd if not DIFFUSERS_KEY.fullmatch(k)] == []
    assert any(k.startswith("text_encoder.text_model.encoder.layers.1.self_attn.out_proj.") for k in sd)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight" in sd
    assert {v.shape[0] for k, v in sd.items() if k.endswith(("lora_A.weight", "down.weight"))} == {4}
    assert len(sd) == len(params)  # every trained factor, nothing else
    assert_comfyui_applies(sd, pipe.unet, pipe.text_encoder, trained_changes(pipe, 0.5))

    loaded = plain_pipeline(tiny_model)
    base = outputs(loaded)
    loaded.load_lora_weights(str(tmp_path / "lora"))
    for got, want, before in zip(outputs(loaded), trained, base):
        assert not torch.allclose(before, want, atol=1e-3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tiny_model_files_load_in_transformers_4_layout(tiny_model, tmp_path):
    """`bas tiny-model`: text-encoder weights under text_model. (transformers 4.x drops other names
    silently) and vocab.json/merges.txt, from which a tokenizer tokenizes as the saved one does."""
    from transformers import CLIPTextModel

    from bas.demo.tiny import build_tiny_pipeline

    keys = load_file(str(tiny_model / "text_encoder" / "model.safetensors")).keys()
    assert keys and all(k.startswith("text_model.") for k in keys)
    model, info = CLIPTextModel.from_pretrained(str(tiny_model / "text_encoder"), output_loading_info=True)
    assert not any(info.values()), info
    built = build_tiny_pipeline(seed=0).text_encoder.state_dict()
    assert all(torch.equal(built[k], v) for k, v in model.state_dict().items())
    assert_tokenizer_files_agree(tiny_model / "tokenizer", tmp_path, ["a photo of a red striped ball", "<|endoftext|> zq"])


def assert_tokenizer_files_agree(folder, tmp_path, prompts):
    """A tokenizer built from vocab.json, merges.txt and tokenizer_config.json alone (what transformers
    4.x's CLIPTokenizer reads) gives the ids of the saved tokenizer.json."""
    from transformers import CLIPTokenizer

    legacy = tmp_path / "legacy-tokenizer"
    shutil.copytree(folder, legacy)
    (legacy / "tokenizer.json").unlink()
    assert (legacy / "merges.txt").read_text().startswith("#version: 0.2\n")
    want = CLIPTokenizer.from_pretrained(str(folder))(prompts).input_ids
    assert CLIPTokenizer.from_pretrained(str(legacy))(prompts).input_ids == want


def test_tiny_flux_t5_tokenizer_has_the_files_transformers_4_reads(tiny_flux_model):
    """`bas tiny-model --family flux`: T5's spiece.model (4.x's T5Tokenizer reads nothing else) tokenizes as the
    saved tokenizer.json, the extra ids 4.x appends from `extra_ids` land where 5.x has them, and the config
    holds no 5.x list where 4.x reads a dict."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = tiny_flux_model / "tokenizer_2"
    saved = AutoTokenizer.from_pretrained(str(folder))
    pieces = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "backend" not in config and not isinstance(config.get("extra_special_tokens"), list)
    assert config["additional_special_tokens"][:2] == ["<extra_id_0>", "<extra_id_1>"] and len(config["additional_special_tokens"]) == config["extra_ids"]
    assert pieces.get_piece_size() + config["extra_ids"] == len(saved)
    assert saved.convert_tokens_to_ids("<extra_id_0>") == len(saved) - 1  # 4.x: vocab_size - 1 - N for <extra_id_N>
    for prompt in ["a photo of a red striped ball at the beach", "A  Photo, of xyzzy  dog!", "cube"]:
        assert pieces.encode(prompt) + [saved.eos_token_id] == saved(prompt).input_ids, prompt


def sd1_unet(tiny_model):
    """The tiny UNet with SD 1.x's 1x1-convolution proj_in/proj_out."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    config = dict(UNet2DConditionModel.load_config(str(tiny_model / "unet")), use_linear_projection=False)
    return UNet2DConditionModel.from_config(config)


@torch.no_grad()
def nudge(model, component, rank=2):
    """A copy of ``model`` with a random rank-``rank`` change in every layer kohya's LoRA covers."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    for name, m in tuned.named_modules():
        if kohya_targets(component, name, m):
            out, inp = m.weight.shape[0], m.weight[0].numel()
            m.weight += (0.05 * torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)).reshape(m.weight.shape)
    return tuned


def test_low_rank_difference_loads_at_the_right_strength_in_every_layer(tiny_model, tmp_path):
    """SD 1.x layout (1x1-convolution projections) at a rank above the smallest layers' size: through
    diffusers' own kohya converter and its diffusers loader, and through ComfyUI's key map, every layer
    becomes base + difference."""
    unet = sd1_unet(tiny_model)
    pipe = plain_pipeline(tiny_model, unet)
    tuned = {"unet": nudge(pipe.unet, "unet"), "text_encoder": nudge(pipe.text_encoder, "text_encoder")}
    rank = 24  # the first UNet level is 16 wide: those layers get rank 16, the rest 24
    layers = [layer for c in ("unet", "text_encoder") for layer in low_rank_difference(getattr(pipe, c), tuned[c], c, rank)]
    convs = {layer.module.rsplit(".", 1)[1] for layer in layers if layer.down.dim() == 4}
    assert convs == {"proj_in", "proj_out"}
    assert {layer.rank for layer in layers} == {16, 24}

    kohya = tmp_path / "k.safetensors"
    write_kohya_lora(layers, kohya, {})
    sd = load_file(str(kohya))
    with safe_open(str(kohya), "pt") as f:
        alpha = f.metadata()["ss_network_alpha"]
    assert alpha == "24.0" and {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {24.0}
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.") for k in sd)
    write_diffusers_lora(layers, tmp_path / "d")

    goal = {(c, n): m.weight.detach() for c in tuned for n, m in tuned[c].named_modules() if kohya_targets(c, n, m)}
    change = {(c, standard_module(c, n)): w - getattr(pipe, c).get_submodule(n).weight.detach() for (c, n), w in goal.items()}
    for source in (kohya, tmp_path / "d" / "pytorch_lora_weights.safetensors"):
        assert_comfyui_applies(load_file(str(source)), pipe.unet, pipe.text_encoder, change, atol=1e-5)
    for source in (kohya, tmp_path / "d"):
        loaded = plain_pipeline(tiny_model, copy.deepcopy(unet))
        loaded.load_lora_weights(str(source))
        loaded.fuse_lora()
        loaded.unload_lora_weights()
        fused = {(c, n): m.weight.detach() for c in tuned for n, m in getattr(loaded, c).named_modules() if kohya_targets(c, n, m)}
        assert fused.keys() == goal.keys() and len(goal) > 100
        worst = max(float((fused[k] - w).abs().max()) for k, w in goal.items())
        assert worst < 1e-5, (source.name, worst)


@pytest.mark.parametrize("preset", ["sd15", "sd21", "sdxl"])
def test_every_key_maps_in_comfyui_and_automatic1111_for_the_real_layouts(preset, tmp_path):
    """SD 1.5, SD 2.1 and SDXL at their real sizes (on the meta device, no weights): every layer a LoRA run or a
    low-rank difference writes, with the family's kohya prefixes (SDXL: lora_te1_, lora_te2_), has a key
    ComfyUI (both layouts) and AUTOMATIC1111 (kohya's) map onto that layer, at the trained scale; A1111
    changes SD 2.x's and SDXL's OpenCLIP attention (one fused in_proj_weight) only with all four of its
    projections, which bas writes.  Each handle's embedding file gives every text encoder its own row in
    both.  With peft's names, which bas wrote before, ComfyUI would leave out the UNet's attention."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import a1111_keys
    from bas.exports.export import write_a1111_embeddings, write_textual_inversions
    from bas.plugins.sdxl import StableDiffusionXL
    from benchmarks.presets import CLIP_VOCAB_SIZE, PRESETS

    p, family = PRESETS[preset], StableDiffusionXL() if preset == "sdxl" else StableDiffusion()
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**p.unet),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, **p.text))}
        if p.text_2:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, **p.text_2))
    g = torch.Generator().manual_seed(0)
    lora_run, difference = [], []  # the layers bas's LoRA trains (rank 4, alpha 2), and those kohya's extraction covers
    for c, model in models.items():
        for n, m in model.named_modules():
            shape = m.weight.shape if hasattr(m, "weight") else None
            if isinstance(m, torch.nn.Linear) and n.endswith(tuple(family.lora_targets[c])):
                lora_run.append(LoraLayer(c, n, torch.randn(4, *shape[1:], generator=g), torch.randn(shape[0], 4, generator=g), 2.0))
            if kohya_targets(c, n, m):
                rank = 2 if len(difference) % 5 == 0 else 4
                difference.append(LoraLayer(c, n, torch.randn(rank, *shape[1:], generator=g), torch.randn(shape[0], rank, *shape[2:], generator=g), float(rank)))
    blocks, text_layers = {"sd15": (16, 12), "sd21": (16, 23), "sdxl": (70, 12 + 32)}[preset]
    attentions = {"sd15": 16, "sd21": 16, "sdxl": 11}[preset]  # one proj_in and proj_out each
    assert len(lora_run) == 8 * blocks + 4 * text_layers and len(difference) == 10 * blocks + 2 * attentions + 6 * text_layers
    assert (preset == "sd15") == any(layer.down.dim() == 4 for layer in difference)  # SD 1.x's 1x1-convolution projections

    comfy_names = comfyui_keys.key_map(*models.values())
    a1111_names = a1111_keys.layer_mapping(*models.values())
    width = {c: m.get_input_embeddings().embedding_dim for c, m in models.items() if c != "unet"}
    info = {"model": "m", "handle_dim": width["text_encoder"], "prediction_type": "epsilon"}
    for layers in (lora_run, difference):
        want = {(x.component, x.module): x for x in layers}
        kohya = tmp_path / "kohya.safetensors"
        write_kohya_lora(layers, kohya, kohya_metadata(info, "scene", {"<asset0>": None}, family), family.kohya_prefixes)
        with safe_open(str(kohya), "pt") as f:
            assert a1111_keys.detect_version(f.metadata()) == {"sd15": "SD1", "sd21": "SD2", "sdxl": "SDXL"}[preset]
        matched, failed = a1111_keys.load_network(load_file(str(kohya)), a1111_names)
        a1111 = a1111_keys.applied(matched, a1111_names)
        assert failed == [] and a1111.keys() == want.keys()
        for lora, loader in ((load_file(str(kohya)), "ComfyUI (kohya)"), (diffusers_state_dict(layers), "ComfyUI (diffusers)")):
            comfy, left_out = comfyui_keys.read_lora(lora, comfy_names)
            assert left_out == [] and comfy.keys() == want.keys(), loader
            for key, (scale, up, down) in comfy.items():  # the trained change alpha / rank * up @ down, as factors
                x = want[key]
                assert torch.equal(down[: x.rank], x.down) and not down[x.rank:].any(), (loader, key)
                torch.testing.assert_close(scale * up[:, : x.rank].float(), x.alpha / x.rank * x.up, msg=f"{loader} {key}")
        for key, (scale, up, down) in a1111.items():
            x = want[key]
            assert torch.equal(down, x.down) and up.shape[0] * down[0].numel() == x.up.shape[0] * x.down[0].numel(), key
            torch.testing.assert_close(scale * up.float(), x.alpha / x.rank * x.up, msg=f"A1111 {key}")
    if preset != "sd15":  # OpenCLIP's q/k/v are rows of one fused in_proj_weight: without one of them A1111 drops the attention
        open_clip = "text_encoder_2" if preset == "sdxl" else "text_encoder"
        v_proj = family.kohya_prefixes[open_clip] + "text_model_encoder_layers_0_self_attn_v_proj."
        matched, _ = a1111_keys.load_network({k: v for k, v in load_file(str(kohya)).items() if not k.startswith(v_proj)}, a1111_names)
        layer_0 = {m for c, m in a1111_keys.applied(matched, a1111_names) if c == open_clip and m.startswith("text_model.encoder.layers.0.")}
        assert layer_0 == {"text_model.encoder.layers.0.mlp.fc1", "text_model.encoder.layers.0.mlp.fc2"}

    rows = {token: {c: torch.randn(w, generator=g) for c, w in width.items()} for token in ("<asset0>", "<asset1>")}
    keys = {"sd15": {"clip_l": "text_encoder"}, "sd21": {"clip_h": "text_encoder"}, "sdxl": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}}[preset]
    files = write_a1111_embeddings(family, rows, tmp_path / "kohya-embeddings", "scene") + write_textual_inversions(family, rows, tmp_path / "embeddings")
    for path in files:
        data, token = load_file(str(path)), f"<{path.stem.rsplit('-', 1)[-1]}>"
        vec, vectors = a1111_keys.load_embedding(data, expected_shape=sum(width.values()))
        assert vectors == 1
        for key, component in keys.items():
            assert torch.equal(a1111_keys.embedding_rows(vec, "clip_g" if key == "clip_g" else "clip_l"), rows[token][component][None]), (path.name, key)
            comfy = comfyui_keys.load_embed(data, key)
            assert comfy.shape[-1] == comfyui_keys.EMBEDDING_KEYS[key] and torch.equal(comfy.reshape(-1), rows[token][component]), (path.name, key)

    peft_names = {f"{x.component}.{x.module}.lora_{f}.weight": t for x in difference for f, t in (("A", x.down), ("B", x.up))}
    _, left_out = comfyui_keys.read_lora(peft_names, comfy_names)
    assert len(left_out) == 2 * blocks * 8 and all(".attn" in k for k in left_out)  # both factors of every attention projection


def previous_layouts(layers, pipe, configs, directory):
    """The diffusers LoRA files of earlier bas versions for ``layers``: (1) diffusers' own
    ``save_lora_weights`` with the peft configs in the header and transformers 5's text-encoder paths,
    (2) peft's names everywhere with the scale folded in and transformers 4's paths."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    first = directory / "first"
    StableDiffusionPipeline.save_lora_weights(
        first, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=configs["unet"].to_dict(), text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict())
    second = directory / "second"
    second.mkdir()
    sd = {}
    for x in layers:
        sd[f"{x.component}.{x.module}.lora_A.weight"] = x.down
        sd[f"{x.component}.{x.module}.lora_B.weight"] = x.scaled_up(x.rank)
    save_file(sd, str(second / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    return [first / "pytorch_lora_weights.safetensors", second / "pytorch_lora_weights.safetensors"]


def test_lora_files_of_earlier_versions_are_read_and_rewritten_in_the_layout_comfyui_maps(tiny_model, tmp_path):
    """Runs written by earlier bas versions still export: their LoRA files read back as the same layers
    (the first version's per-layer alpha from its peft config), and written again they map in ComfyUI,
    which left out their UNet keys."""
    from bas.plugins.lora import Lora

    pipe = plain_pipeline(tiny_model)
    strategy = Lora(SimpleNamespace(options={"lora_rank": 4, "lora_alpha": 2.0}))
    family = StableDiffusion()
    run = SimpleNamespace(family=family, components=Components(family, family.pipeline_text_encoders(pipe), pipe.unet, pipe.vae, pipe.scheduler),
                          device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in strategy.prepare(run):
            p.copy_(torch.randn_like(p) * 0.1)
    want = trained_changes(pipe, 0.5)
    strategy.save(run, tmp_path)
    layers = read_diffusers_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    configs = strategy.configs
    for path in previous_layouts(layers, pipe, configs, tmp_path):
        old = load_file(str(path))
        _, left_out = comfyui_keys.load_lora(old, comfyui_keys.key_map(pipe.unet, pipe.text_encoder))
        assert {k for k in old if k.startswith("unet.")} <= set(left_out) and left_out  # (1) leaves out all
        read = read_diffusers_lora(path)
        assert {(x.component, x.module) for x in read} == want.keys()
        for x in read:
            got = x.alpha / x.rank * x.up @ x.down
            torch.testing.assert_close(got, want[(x.component, x.module)], atol=1e-6, rtol=1e-5)
        write_diffusers_lora(read, tmp_path / "again")
        assert_comfyui_applies(load_file(str(tmp_path / "again" / "pytorch_lora_weights.safetensors")), pipe.unet, pipe.text_encoder, want)


@pytest.mark.parametrize("key", [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_x_lora.down.weight",
    "unet.processor.to_q_lora.down.weight",
    "vae.decoder.conv_in.lora.down.weight",
    "unet.down_blocks.0.attentions.0.proj_in.lora_down.weight",
])
def test_reading_refuses_keys_of_other_layouts(key, tmp_path):
    from bas.core.errors import BasError

    path = tmp_path / "l.safetensors"
    save_file({key: torch.zeros(2, 3), key.replace("down", "up"): torch.zeros(3, 2)}, str(path))
    with pytest.raises(BasError, match=r"holds a key bas does not know \(.+\); export a LoRA written by `bas run`"):
        read_diffusers_lora(path)


@pytest.mark.parametrize("handle_dim, prediction, version, architecture, resolution", [
    (768, "epsilon", "sd_v1", "stable-diffusion-v1/lora", "512x512"),
    (1024, "epsilon", "sd_v2", "stable-diffusion-v2-512/lora", "512x512"),
    (1024, "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "768x768"),
])
def test_kohya_header_names_the_base_model_as_kohya_does(handle_dim, prediction, version, architecture, resolution):
    info = {"model": "m", "handle_dim": handle_dim, "prediction_type": prediction, "resolution": int(resolution[:3])}
    meta = kohya_metadata(info, "toys", {"<asset0>": None, "<asset1>": None}, StableDiffusion())
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == architecture
    assert meta["ss_v2"] == str(handle_dim == 1024) and meta["modelspec.resolution"] == resolution
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert json.loads(meta["ss_tag_frequency"]) == {"toys": {"toys-asset0": 1, "toys-asset1": 1}}
    assert meta["modelspec.trigger_phrase"] == "toys-asset0, toys-asset1"
