"""bas-mini: its world's masks and captions, reading images back from pixels, the shipped model
(the fidelity benchmark: tests/test_fidelity.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from bas.mini import metrics, model_path, world


def scenes(count: int, seed: int = 0, novel: bool = False):
    rng = random.Random(seed)
    for _ in range(count):
        if novel:
            objects = [(c, rng.choice(world.SHAPES), rng.choice(world.TEXTURES + world.NOVEL_TEXTURES)) for c in rng.sample(world.NOVEL_COLOURS, rng.randint(1, 3))]
            yield world.random_scene(rng, objects=objects)
        else:
            yield world.random_scene(rng)


@pytest.mark.parametrize("novel", [False, True])
def test_masks_match_drawings(novel):
    for scene in scenes(40, novel=novel):
        image, masks = world.render(scene)
        pixels = np.asarray(image, dtype=np.float32)
        background = np.array(world.PALETTE[scene.background], dtype=np.float32)
        coverage = np.sum(masks, axis=0)
        assert np.allclose(pixels[coverage == 0], background, atol=1), "no object is drawn outside the masks"
        assert coverage.max() <= 1.0 + 1e-5, "objects do not overlap"
        if all(o.texture == "plain" for o in scene.objects):  # then the image is the masks' blend of the colours, to the pixel
            composite = background * (1 - coverage[..., None])
            for obj, mask in zip(scene.objects, masks):
                composite += np.array(world.PALETTE[obj.colour], dtype=np.float32) * mask[..., None]
            assert np.abs(composite - pixels).max() <= 1.5
        for obj, mask in zip(scene.objects, masks):
            inside = pixels[mask > 0.99]
            allowed = np.array([world.PALETTE[obj.colour], world.TEXTURE_COLOUR], dtype=np.float32)
            nearest = np.abs(inside[:, None] - allowed).sum(-1).min(-1)
            assert np.median(nearest) < 1, "an object's pixels are its colour or its texture's"
            if obj.texture == "plain":
                assert np.allclose(inside, world.PALETTE[obj.colour], atol=1)


def test_captions_use_the_training_vocabulary_only():
    rng = random.Random(0)
    for scene in scenes(200):
        for obj in scene.objects:
            assert obj.colour in world.COLOURS and obj.colour != scene.background
            assert (obj.colour, obj.shape) not in world.HELD_OUT and obj.texture in world.TEXTURES
        words = set(world.training_caption(rng, scene, drop=0).split())
        assert words <= set(world.VOCABULARY)
        assert not words & set(world.NOVEL_COLOURS + world.NOVEL_TEXTURES)
    s = world.Scene("green", [world.Shape("blue", "square", "plain", (40, 5, 60, 25)), world.Shape("red", "circle", "striped", (2, 2, 20, 20))])
    assert s.caption() == "a red striped circle and a blue square on a green background"


def test_pixel_reading_recovers_every_drawn_attribute():
    from bas.mini import quality

    rng = random.Random(2)
    drawn = list(scenes(40)) + list(scenes(40, seed=1, novel=True)) + [world.any_scene(rng, touching=0.0) for _ in range(40)]
    drawn += quality.reconstruction_scenes(20)  # a third of their objects dotted
    for scene in drawn:
        reading = metrics.read_image(world.render(scene)[0])
        assert reading.background == scene.background
        assert len(reading.objects) == len(scene.objects)
        for obj in scene.objects:
            found = reading.find(colour=obj.colour)
            assert found is not None and (found.shape, found.texture) == (obj.shape, obj.texture), (scene, found)
        assert quality.score(scene, reading) == dict.fromkeys(quality.ATTRIBUTES, 1.0)


def test_pixel_reading_sees_a_missing_object_and_a_wrong_background():
    scene = world.Scene("grey", [world.Shape("purple", "circle", "dotted", (10, 10, 36, 36))])
    reading = metrics.read_image(world.render(scene)[0])
    assert reading.find(colour="purple", shape="circle", texture="dotted") is not None
    assert reading.find(colour="orange") is None and reading.find(colour="purple", shape="square") is None
    blank = metrics.read_image(Image.new("RGB", (64, 64), world.PALETTE["yellow"]))
    assert blank.background == "yellow" and blank.objects == []


def test_tokenizer_keeps_every_world_word_whole():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_path(), subfolder="tokenizer")
    assert all(len(tokenizer.tokenize(w)) == 1 for w in world.VOCABULARY)


def test_shipped_model_is_small_recorded_and_generates_offline(tmp_path):
    import torch

    from bas.core.model import load_pipeline

    files = [p for p in model_path().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 40e6  # issue 28's budget for the shipped weights
    assert {p.name for p in files} >= {"model_index.json", "diffusion_pytorch_model.safetensors", "model.safetensors", "training.json"}
    record = json.loads((model_path() / "training.json").read_text())
    assert record["unet_steps_done"] == record["config"]["unet_steps"] and record["final_loss"] < 1.0  # trained to the end
    quality = json.loads((model_path() / "quality.json").read_text())["sets"]  # measured on these weights (python -m bas.mini.quality)
    assert quality["new scenes"]["all correct"] >= 0.8 and quality["held-out pairs"]["all correct"] >= 0.8  # issue 28's targets
    vae = quality["vae reconstruction"]
    assert vae["dotted kept"] >= 0.95 and vae["core kept"] >= 0.95 and vae["unnamed colour kept"] >= 0.95  # every unnamed texture and colour
    unet = json.loads((model_path() / "unet" / "config.json").read_text())
    assert len(unet["block_out_channels"]) == 3 and record["config"]["vae_channels"] == [32, 64, 64]  # 16x16 latents, so 16x16 attention maps
    assert "unnamed shape kept" in vae and "core kept" in vae  # measured on v3's world
    pipe = load_pipeline("bas-mini", torch.device("cpu"), torch.float32)  # the name resolves to the shipped folder
    image = pipe("a red circle on a blue background", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 1, "not a blank image"


@pytest.mark.old_stack  # also run on the oldest supported stack (CI): the shipped model is a plain diffusers folder
def test_shipped_model_loads_in_plain_diffusers_and_draws_what_it_is_asked():
    """Loaded by diffusers' own StableDiffusionPipeline (no bas code), it draws captions of its world:
    every prompt's background and object colour read back from the pixels."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_path()), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    asked = [("red", "circle", "blue"), ("green", "square", "grey"), ("yellow", "triangle", "black"), ("blue", "square", "yellow")]
    prompts = [f"a {colour} {shape} on a {background} background" for colour, shape, background in asked]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=7.5, generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
    right = 0
    for (colour, shape, background), image in zip(asked, images):
        reading = metrics.read_image(image)
        right += reading.background == background and reading.find(colour=colour, shape=shape) is not None
    assert right >= 3, f"only {right} of 4 captions drawn right"


def test_min_snr_weights_clip_only_the_nearly_clean_timesteps():
    import torch

    from bas.mini.train import TrainConfig, build_scheduler, loss_weights

    alphas = build_scheduler(TrainConfig()).alphas_cumprod
    assert float(alphas[-1]) == 0.0, "zero-terminal SNR: the last training step is pure noise"
    t = torch.arange(1000)
    snr = alphas.double() / (1 - alphas.double())
    w = loss_weights(alphas, t, 5.0).double()
    assert torch.allclose(w[snr > 5] * snr[snr > 5], torch.full_like(w[snr > 5], 5.0), rtol=1e-4)  # min(SNR, 5) / SNR
    assert torch.equal(w[snr <= 5], torch.ones_like(w[snr <= 5])) and float(w[-1]) == 1.0  # pure noise is trained
    assert 50 < int((snr > 5).sum()) < 300 and bool((w[1:] >= w[:-1]).all())
    assert torch.equal(loss_weights(alphas, t, 0.0), torch.ones(1000))


def test_training_command_writes_a_loadable_recorded_pipeline(tmp_path):
    from click.testing import CliRunner

    from bas.core.model import load_components
    from bas.mini import train

    out = tmp_path / "m"
    args = ["--out", out, "--num-scenes", 8, "--vae-scenes", 8, "--vae-channels", "8,16,16", "--vae-steps", 2, "--unet-channels", "16,32",
            "--unet-heads", "1,1", "--unet-steps", 3, "--unet-batch", 2, "--save-every", 2]
    result = CliRunner().invoke(train.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "training.json").read_text())
    assert record["unet_steps_done"] == 3 and len(record["vae_history"]) == 1 and record["config"]["unet_channels"] == [16, 32]
    assert record["parameters"]["unet"] > 0 and "load_average" in record or record.get("load_average") is None
    c = load_components(str(out))  # the loader bas run uses
    assert c.vae_scale_factor == 4 and c.native_resolution == 64
    assert c.noise_scheduler.config.prediction_type == "v_prediction" and float(c.noise_scheduler.alphas_cumprod[-1]) == 0.0
    assert (tmp_path / "m-train.log").read_text().count("unet step") == 0  # logged every 25 steps
    bad = CliRunner().invoke(train.main, ["--out", str(out), "--unet-channels", "16,32", "--unet-heads", "1"])
    assert bad.exit_code != 0 and "one head dimension per UNet level" in bad.output


def test_training_resumes_bit_identically_and_refuses_changed_options(tmp_path):
    import torch
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from bas.mini import train

    base = ["--num-scenes", 8, "--vae-scenes", 8, "--vae-channels", "8,16,16", "--vae-steps", 2, "--unet-channels", "16,32",
            "--unet-heads", "1,1", "--unet-steps", 6, "--unet-batch", 2, "--save-every", 2]
    run = lambda *args: CliRunner().invoke(train.main, [str(a) for a in args])
    assert run("--out", tmp_path / "a", *base).exit_code == 0
    stopped = run("--out", tmp_path / "b", *base, "--stop-after", 3)  # the 2 VAE steps and one UNet step, saving the exact state
    assert stopped.exit_code == 0 and json.loads((tmp_path / "b" / "training.json").read_text())["unet_steps_done"] == 1
    assert (tmp_path / "b-state" / "state.safetensors").exists()
    assert run("--out", tmp_path / "b", *base, "--resume").exit_code == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / part)), load_file(str(tmp_path / "b" / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "b" / "training.json").read_text())
    assert record["unet_steps_done"] == 6 and record["legs"][0]["unet_steps_done"] == 1 and record["legs"][0]["resumed_exactly"]
    assert not (tmp_path / "b-state").exists()  # the state goes once the run is whole
    done = run("--out", tmp_path / "b", *base, "--resume")
    assert done.exit_code != 0 and "already trained all 6 UNet steps" in done.output
    changed = run("--out", tmp_path / "b", *base[:-4], "--unet-steps", 9, "--unet-lr", 1, "--resume")
    assert changed.exit_code != 0 and "--unet-lr, --unet-steps" in changed.output
    stopped = run("--out", tmp_path / "c", *base, "--stop-after", 3)
    (tmp_path / "c-state" / "state.safetensors").write_bytes(b"cut short")  # a state file a crash left half-written
    damaged = run("--out", tmp_path / "c", *base, "--resume")
    assert damaged.exit_code != 0 and "is damaged" in damaged.output and "delete that folder" in damaged.output
    assert json.loads((tmp_path / "c" / "training.json").read_text())["unet_steps_done"] == 1  # the saved run is untouched
    missing = run("--out", tmp_path / "none", *base, "--resume")
    assert missing.exit_code != 0 and "run without --resume" in missing.output


def test_training_stopped_in_the_vae_stage_resumes_bit_identically(tmp_path):
    """A long training stopped before its UNet stage began (a budget, SIGTERM, a session's end) continues
    from the VAE stage's exact state: the same VAE, UNet and text encoder as an uninterrupted run."""
    import torch
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from bas.mini import train

    base = ["--num-scenes", 8, "--vae-scenes", 8, "--vae-channels", "8,16,16", "--vae-steps", 4, "--unet-channels", "16,32",
            "--unet-heads", "1,1", "--unet-steps", 2, "--unet-batch", 2, "--save-every", 2]
    run = lambda *args: CliRunner().invoke(train.main, [str(a) for a in args])
    assert run("--out", tmp_path / "a", *base).exit_code == 0
    stopped = run("--out", tmp_path / "b", *base, "--stop-after", 3)  # VAE step 3 of 4: between two periodic saves
    assert stopped.exit_code == 0 and "Stopped in the VAE stage" in stopped.output and "--resume" in stopped.output
    record = json.loads((tmp_path / "b" / "training.json").read_text())
    assert record["stage"] == "vae" and record["vae_steps_done"] == 3 and (tmp_path / "b-vae-state" / "state.safetensors").exists()
    assert not (tmp_path / "b" / "unet").exists()
    resumed = run("--out", tmp_path / "b", *base, "--resume")
    assert resumed.exit_code == 0, resumed.output
    for part in ("vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / part)), load_file(str(tmp_path / "b" / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    record = json.loads((tmp_path / "b" / "training.json").read_text())
    assert "stage" not in record and record["unet_steps_done"] == 2 and record["legs"][0]["vae_steps_done"] == 3
    assert record["times"]["cpu_s"] >= record["legs"][0]["cpu_s"] > 0  # the earlier leg's CPU time counts
    assert not (tmp_path / "b-vae-state").exists()
    stopped = run("--out", tmp_path / "c", *base, "--stop-after", 1)
    (tmp_path / "c-vae-state" / "state.safetensors").write_bytes(b"cut short")  # a state a crash left half-written
    damaged = run("--out", tmp_path / "c", *base, "--resume")
    assert damaged.exit_code != 0 and "is damaged" in damaged.output and "Traceback" not in damaged.output


def test_outline_band_marks_a_shapes_outline_and_nothing_else():
    import torch

    from benchmarks.mini_decoder import outline_band, weighted_mse

    x = torch.full((1, 3, 32, 32), -1.0)
    x[..., 8:24, 8:24] = 1.0  # a square
    band = outline_band(x)[0, 0]
    assert band[16, 5:11].tolist() == [0, 1, 1, 1, 1, 0] and band[16, 21:27].tolist() == [
        0,
        1,
        1,
        1,
        1,
        0,
    ]  # both pixels of each edge, and one more either side
    assert band[16, 12:20].sum() == 0 and band[0:5].sum() == 0  # not inside, not the flat background
    # the same squared error counts more on the outline than inside the square
    on, off = x.clone(), x.clone()
    on[..., 16, 8] -= 0.5
    off[..., 16, 16] -= 0.5
    assert float(weighted_mse(on, x, 4.0)) == pytest.approx(5 * float(weighted_mse(off, x, 4.0)))
    assert float(weighted_mse(on, x, 0.0)) == pytest.approx(float(weighted_mse(off, x, 0.0)))


def test_decoder_finetune_changes_the_decoder_only_and_writes_a_whole_pipeline(tmp_path):
    import torch
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from bas.mini import train
    from benchmarks import mini_decoder as decoder

    base = tmp_path / "m"
    args = [
        "--out",
        base,
        "--num-scenes",
        8,
        "--vae-scenes",
        8,
        "--vae-channels",
        "8,16,16",
        "--vae-steps",
        2,
        "--unet-channels",
        "16,32",
        "--unet-heads",
        "1,1",
        "--unet-steps",
        2,
        "--unet-batch",
        2,
    ]
    assert CliRunner().invoke(train.main, [str(a) for a in args]).exit_code == 0
    out = tmp_path / "sharp"
    result = CliRunner().invoke(decoder.main, ["--model", str(base), "--out", str(out), "--steps", "3", "--batch", "2", "--scenes", "6"])
    assert result.exit_code == 0, result.output
    before, after = (load_file(d / "vae" / "diffusion_pytorch_model.safetensors") for d in (base, out))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[
        :5
    ]  # the encoder, so the latents, untouched
    for part in ("unet", "text_encoder"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        a, b = load_file(base / part / name), load_file(out / part / name)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    record = json.loads((out / "training.json").read_text())
    assert record["unet_steps_done"] == 2 and record["decoder_finetune"]["steps"] == 3 and len(record["decoder_finetune"]["history"]) == 1
    again = CliRunner().invoke(decoder.main, ["--model", str(base), "--out", str(out), "--steps", "1"])
    assert again.exit_code != 0 and "already holds files" in again.output  # never writes over a pipeline
    same = CliRunner().invoke(decoder.main, ["--model", str(base), "--out", str(base), "--steps", "1"])
    assert same.exit_code != 0 and "already holds files" in same.output  # --out the --model folder: kept as it was
    (tmp_path / "a-file").write_text("mine")
    onto_file = CliRunner().invoke(decoder.main, ["--model", str(base), "--out", str(tmp_path / "a-file"), "--steps", "1"])
    assert onto_file.exit_code != 0 and "is a file; pass a folder path" in onto_file.output and (tmp_path / "a-file").read_text() == "mine"
    assert load_file(base / "vae" / "diffusion_pytorch_model.safetensors").keys() == before.keys()


def test_caption_fidelity_judges_what_the_caption_names_and_exact_judges_the_rest():
    from bas.mini import quality

    box = (14, 14, 50, 50)
    asked = world.Scene("grey", [world.Shape("red", "square", "plain", box)])  # "a red square on a grey background"
    for drawn, caption_right in [
        (world.Shape("red", "square", "plain", box), True),
        (world.Shape("red", "square", "dotted", box), True),  # its caption is "a red square" too
        (world.Shape("red", "square", "plain", box, inner="cyan"), True),  # a core is never named
        (world.Shape("red", "square", "striped", box), False),  # "striped" is named
        (world.Shape("red", "circle", "plain", box), False),
        (world.Shape("blue", "square", "plain", box), False),
    ]:
        reading = metrics.read_image(world.render(world.Scene("grey", [drawn]))[0])
        s = quality.score(asked, reading)
        assert s["all correct"] == float(caption_right), drawn
        assert s["exact"] == float(drawn == asked.objects[0]), drawn
        # a reconstruction must keep everything: exact=True judges every attribute as drawn
        assert quality.score(world.Scene("grey", [drawn]), reading, exact=True)["all correct"] == 1.0
        assert quality.score(asked, reading, exact=True)["all correct"] == float(drawn == asked.objects[0]), drawn
    striped = world.Scene("grey", [world.Shape("red", "square", "striped", box)])
    dotted = metrics.read_image(world.render(world.Scene("grey", [world.Shape("red", "square", "dotted", box)]))[0])
    assert quality.score(striped, dotted)["object texture"] == 0.0  # asked striped, drawn dotted: wrong
    thing = world.Scene("grey", [world.Shape("red", "cross", "plain", box)])  # "a red thing": either unnamed shape
    diamond = metrics.read_image(world.render(world.Scene("grey", [world.Shape("red", "diamond", "plain", box)]))[0])
    assert quality.score(thing, diamond)["all correct"] == 1.0 and quality.score(thing, diamond)["exact"] == 0.0
