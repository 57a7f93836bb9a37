"""Generation options, the background handle, and local editing (bas edit) on a finished run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import bas
from bas.core.errors import BasError
from bas.generation.generate import SCHEDULERS, generate_images, make_scheduler
from bas.core.scene import BACKGROUND_NAME, SceneInput, prepare_scene


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_generate_takes_a_prompts_file_variations_seeds_a_size_and_writes_a_grid(rich_run, invoke, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one prompt per line\na photo of <asset0> at the beach\n\na photo of <asset1>\n")
    result = invoke("generate", rich_run, "--prompts-file", prompts, "--variations", "--seeds", "3,7", "--steps", 2,
                    "--width", 64, "--height", 128, "--scheduler", "euler-a", "--negative-prompt", "blurry", "--out-dir", tmp_path / "g")
    assert result.exit_code == 0, result.output
    stems = ["a-photo-of-asset0-at-the-beach", "a-photo-of-asset1", "a-photo-of-asset0-and-asset1-and-asset2"]
    singles = [tmp_path / "g" / f"{stem}-seed{s}.png" for stem in stems for s in (3, 7)]
    grid = tmp_path / "g" / "grid-a-photo-of-asset0-at-the-beach-and-2-more-seed3.png"
    assert sorted((tmp_path / "g").iterdir()) == sorted(singles + [grid])
    assert result.stdout.split() == [str(p) for p in singles + [grid]]
    assert pixels(singles[0]).shape == (128, 64, 3)
    tiles = pixels(grid)
    assert tiles.shape == (3 * 128, 2 * 64, 3)
    np.testing.assert_array_equal(tiles[128:256, 64:128], pixels(singles[3]))  # row: prompt, column: seed


def test_a_batch_draws_each_image_from_its_own_seed_as_one_at_a_time_does(rich_run, invoke, tmp_path):
    prompts = ["a photo of <asset0>", "a photo of <asset1> at the beach"]
    options = dict(seeds=[3, 7, 11], steps=2, negative_prompt="blurry", device="cpu")
    alone = generate_images(rich_run, prompts, out_dir=tmp_path / "alone", **options)
    batched = generate_images(rich_run, prompts, out_dir=tmp_path / "batched", batch_size=4, **options)  # chunks of 4 and 2, across prompts
    assert [p.name for p in batched] == [p.name for p in alone]  # the same files, grid last
    for a, b in zip(alone, batched):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2, a.name  # rounding only: each image keeps its seed's noise
    assert not np.array_equal(pixels(batched[0]), pixels(batched[1]))  # seeds 3 and 7 are not one image repeated
    from bas.core.io import IMAGE_RECORD

    with Image.open(batched[5]) as image:  # the record names the image's own prompt and seed
        assert {k: json.loads(image.info[IMAGE_RECORD])[k] for k in ("prompt", "seed")} == {"prompt": prompts[1], "seed": 11}
    result = invoke("generate", rich_run, "a photo of <asset0>", "--batch-size", 0, "--out-dir", tmp_path / "bad")
    assert result.exit_code == 1 and "--batch-size" in result.output and not (tmp_path / "bad").exists()
    with pytest.raises(BasError, match="batch_size must be at least 1|--batch-size must be at least 1"):
        generate_images(rich_run, prompts, out_dir=tmp_path / "bad", batch_size=0, device="cpu")


def test_negative_prompt_and_lora_scale_change_the_image(rich_run, tiny_model, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    def one(name, **options):
        (path,) = generate_images(rich_run, ["a photo of <asset0>"], seeds=[0], steps=2, out_dir=tmp_path / name, device="cpu", **options)
        return pixels(path)

    plain = one("plain")
    assert not np.array_equal(plain, one("negative", negative_prompt="a photo of <asset1>", scheduler="dpm++"))
    without_lora = one("scale0", lora_scale=0.0)
    assert not np.array_equal(plain, without_lora)
    # --lora-scale 0 is the base model with the handles only: the same image plain diffusers makes
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion([str(p) for p in sorted((rich_run / "embeddings").glob("*.safetensors"))])
    image = pipe("a photo of <asset0>", num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=128, width=128).images[0]
    assert np.abs(np.asarray(image, dtype=np.float32) - without_lora).max() <= 1


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_name_makes_a_scheduler(name, tiny_model):
    from diffusers import DDIMScheduler

    scheduler = make_scheduler(name, DDIMScheduler.from_pretrained(str(tiny_model), subfolder="scheduler").config)
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4 and type(scheduler).__name__ == SCHEDULERS[name][0]


@pytest.mark.parametrize("args, message", [
    (["a photo of <asset0>", "--scheduler", "nope"], "Invalid value for '--scheduler'"),
    (["a photo of <asset0>", "--width", 100], "--width must be a positive multiple of 8"),
    (["a photo of <asset7>"], "names <asset7> but this run has 3 handles"),
    ([], "No prompt"),
    (["--prompts-file", "missing.txt"], "Prompts file missing.txt does not exist"),
])
def test_generate_user_errors(args, message, rich_run, invoke):
    result = invoke("generate", rich_run, *args)
    assert result.exit_code != 0 and message in result.output, result.output


def test_background_handle_is_the_complement_of_all_masks(rich_run):
    info = json.loads((rich_run / "run.json").read_text())
    assert info["handles"] == ["<asset0>", "<asset1>", "<asset2>"] and info["background"] == "<asset2>"
    assert info["masks"][-1] == BACKGROUND_NAME and info["config"]["background"] is True

    a, b = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)
    a[:4, :4], b[4:, 4:] = 1.0, 0.6
    scene = prepare_scene(SceneInput(Image.new("RGB", (8, 8)), [a, b]), 8, background=True)
    assert scene.num_concepts == 3 and scene.background
    assert torch.allclose(scene.masks[2], 1 - torch.maximum(scene.masks[0], scene.masks[1]))
    assert scene.init_words(["ball", "box"]) == ["ball", "box", "background"]
    assert scene.init_words([]) == ["object", "object", "background"]
    assert prepare_scene(SceneInput(Image.new("RGB", (8, 8)), [a, b]), 8).init_words([]) is None
    left, right = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)
    left[:, :4], right[:, 4:] = 1.0, 1.0
    with pytest.raises(BasError, match="leave out --background"):
        prepare_scene(SceneInput(Image.new("RGB", (8, 8)), [left, right]), 8, background=True)


def test_edit_changes_pixels_inside_the_mask_and_composite_keeps_the_outside(rich_run, scene, invoke, tmp_path):
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((40, 40, 89, 89), fill=255)
    mask.save(tmp_path / "mask.png")
    result = invoke("edit", rich_run, "a photo of <asset1>", "--image", scene / "img.png", "--mask", tmp_path / "mask.png",
                    "--steps", 4, "--seeds", "0,1", "--composite", "--out-dir", tmp_path / "e")
    assert result.exit_code == 0, result.output
    paths = [tmp_path / "e" / f"edit-a-photo-of-asset1-seed{s}.png" for s in (0, 1)]
    assert result.stdout.split() == [str(p) for p in paths]
    source, inside = pixels(scene / "img.png"), np.asarray(mask) > 127
    for path in paths:
        diff = np.abs(pixels(path) - source)
        assert diff[inside].mean() > 20
        assert diff[~inside].max() <= 1
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))


def test_edit_follows_the_blended_latent_diffusion_script(rich_run, scene, tmp_path, monkeypatch):
    """A quarter into the schedule, from pure noise; after every step the input's latents noised to that
    step with fresh noise replace the outside of the nearest-sampled mask; the decoded result as is."""
    import diffusers

    from bas.editing.edit import edit_images, latent_mask

    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((40, 40, 89, 89), fill=255)
    mask.save(tmp_path / "mask.png")
    blends, calls = [], []
    add_noise = diffusers.DDIMScheduler.add_noise

    def recording_add_noise(self, original, noise, t):
        blends.append((int(t), noise.clone()))
        return add_noise(self, original, noise, t)

    monkeypatch.setattr(diffusers.DDIMScheduler, "add_noise", recording_add_noise)
    unet_forward = diffusers.UNet2DConditionModel.forward
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward",
                        lambda self, sample, t, *a, **k: calls.append((int(t), sample.clone())) or unet_forward(self, sample, t, *a, **k))
    (path,) = edit_images(rich_run, "a photo of <asset1>", scene / "img.png", tmp_path / "mask.png", steps=8, out_dir=tmp_path / "e", device="cpu")
    timesteps = [875, 750, 625, 500, 375, 250, 125, 0][2:]  # DDIM over 1000 steps from 0, as the script's; a quarter skipped
    assert [t for t, _ in calls] == timesteps and [t for t, _ in blends] == timesteps
    assert all(not torch.equal(a, b) for (_, a), (_, b) in zip(blends, blends[1:]))  # fresh noise at every blend
    first_input = calls[0][1][:1]
    assert first_input.std() > 0.8  # pure noise, not the input's latents: inside and outside alike
    # the mask on the latent grid: nearest samples (pixels 0, 8, 16, ...) of the 128 px mask, thresholded at
    # 0.5; cell 11 holds pixels 88-95, of which only 88-89 are white, and is in (an area average would drop it)
    grid = latent_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None], (16, 16))[0, 0]
    assert grid.sum() == 49 and grid[5:12, 5:12].all()
    source = pixels(scene / "img.png")
    assert np.abs(pixels(path) - source)[~(np.asarray(mask) > 127)].max() > 1  # not pasted over the input


def test_edit_refuses_an_empty_mask(rich_run, scene, invoke, tmp_path):
    Image.new("L", (128, 128), 0).save(tmp_path / "empty.png")
    result = invoke("edit", rich_run, "a photo of <asset1>", "--image", scene / "img.png", "--mask", tmp_path / "empty.png")
    assert result.exit_code == 1 and "marks nothing to edit" in result.output


def test_edit_says_when_it_stretches_a_mask_of_another_aspect_as_run_does(rich_run, scene, tmp_path):
    from bas.cli import main

    wide = square_mask(tmp_path / "wide.png", size=(256, 128), box=(60, 30, 180, 90))
    with pytest.warns(UserWarning, match=re.escape(f"{wide} is 256x128 but the image is 128x128; the mask is stretched to the image's size.")):
        main([str(a) for a in ["edit", rich_run, "a photo of <asset1>", "--image", scene / "img.png", "--mask", wide, "--steps", 1,
                               "--out-dir", tmp_path / "e"]])
    assert (tmp_path / "e" / "edit-a-photo-of-asset1-seed0.png").is_file()


@pytest.mark.parametrize("call", ["generate", "edit"])
@pytest.mark.parametrize("seeds, message", [
    ({"seed": -1}, "--seed must be 0 or more, not -1"),
    ({"seed": 2**63 - 1, "num_images": 2}, "--seed 9223372036854775807 plus 1 more seeds passes"),
    ({"seeds": [3, 2**64]}, "--seeds must be at most 9223372036854775807"),
    ({"seeds": "3,7"}, "--seeds must be a list of whole numbers"),
])
def test_the_python_api_checks_seeds_as_the_command_line_does(call, seeds, message, rich_run, scene, tmp_path):
    """``bas.generate`` and ``bas.edit`` refuse the seeds ``bas generate``/``bas edit`` refuse, before the model loads."""
    out_dir = tmp_path / "images"
    with pytest.raises(BasError, match=re.escape(message)):
        if call == "generate":
            bas.generate(rich_run, "a photo of <asset0>", steps=1, out_dir=out_dir, **seeds)
        else:
            bas.edit(rich_run, "a photo of <asset0>", scene / "img.png", scene / "mask0.png", steps=1, out_dir=out_dir, **seeds)
    assert not out_dir.exists()


# -- bas edit takes bas generate's sampling options ----------------------------------------------------------------------
def square_mask(path, size=(128, 128), box=(40, 40, 89, 89)):
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    mask.save(path)
    return path


def test_edit_takes_a_prompts_file_and_seeds_one_image_per_prompt_and_seed(rich_run, scene, invoke, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one prompt per line\na photo of <asset1>\n\na photo of <asset0> at the beach\n")
    result = invoke("edit", rich_run, "--prompts-file", prompts, "--seeds", "3,7", "--image", scene / "img.png",
                    "--mask", square_mask(tmp_path / "mask.png"), "--steps", 2, "--out-dir", tmp_path / "e")
    assert result.exit_code == 0, result.output
    paths = [tmp_path / "e" / f"edit-{stem}-seed{s}.png" for stem in ("a-photo-of-asset1", "a-photo-of-asset0-at-the-beach") for s in (3, 7)]
    assert result.stdout.split() == [str(p) for p in paths] and sorted((tmp_path / "e").iterdir()) == sorted(paths)
    images = [pixels(p) for p in paths]
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])  # each prompt and seed its own
    # a prompt on the command line comes first, then the file's
    result = invoke("edit", rich_run, "a photo of <asset0>", "--prompts-file", prompts, "--image", scene / "img.png",
                    "--mask", tmp_path / "mask.png", "--steps", 2, "--out-dir", tmp_path / "e2")
    assert result.exit_code == 0, result.output
    assert [p.name for p in map(Path, result.stdout.split())] == ["edit-a-photo-of-asset0-seed0.png", "edit-a-photo-of-asset1-seed0.png",
                                                                  "edit-a-photo-of-asset0-at-the-beach-seed0.png"]


def test_edit_width_and_height_give_that_size_with_the_input_cropped_to_it(rich_run, scene, invoke, tmp_path):
    from bas.editing.edit import fit

    mask = square_mask(tmp_path / "mask.png")
    result = invoke("edit", rich_run, "a photo of <asset1>", "--image", scene / "img.png", "--mask", mask, "--steps", 2,
                    "--width", 64, "--height", 128, "--composite", "--out-dir", tmp_path / "e")
    assert result.exit_code == 0, result.output
    out = pixels(tmp_path / "e" / "edit-a-photo-of-asset1-seed0.png")
    assert out.shape == (128, 64, 3)
    # outside the mask the composite is the input, centre-cropped to 64x128 as bas run crops (not squashed)
    with Image.open(scene / "img.png") as img, Image.open(mask) as m:
        source = np.asarray(fit(img.convert("RGB"), 64, 128, Image.BICUBIC), dtype=np.float32)
        outside = np.asarray(fit(m.convert("L"), 64, 128, Image.BILINEAR)) == 0
    assert outside.any() and (~outside).any()
    assert np.abs(out - source)[outside].max() <= 1


def test_edit_blend_start_is_where_sampling_starts(rich_run, scene, tmp_path, monkeypatch):
    import diffusers

    from bas.editing.edit import edit_images

    mask = square_mask(tmp_path / "mask.png")
    calls = []
    unet_forward = diffusers.UNet2DConditionModel.forward
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward",
                        lambda self, sample, t, *a, **k: calls.append(int(t)) or unet_forward(self, sample, t, *a, **k))
    images, counts = {}, {}
    for start in (None, 0.0, 0.5):
        calls.clear()
        options = {} if start is None else {"blend_start": start}
        (path,) = edit_images(rich_run, "a photo of <asset1>", scene / "img.png", mask, steps=4, out_dir=tmp_path / f"e{start}", device="cpu",
                              **options)
        images[start], counts[start] = pixels(path), list(calls)
    # DDIM's 4 steps over 1000 timesteps counted from 0: 750, 500, 250, 0; the default skips a quarter
    assert counts == {None: [500, 250, 0], 0.0: [750, 500, 250, 0], 0.5: [250, 0]}
    assert not np.array_equal(images[None], images[0.0]) and not np.array_equal(images[None], images[0.5])


@pytest.mark.parametrize("args, message", [
    (["--blend-start", 1], "--blend-start must be at least 0 and below 1 (the script's 0.25), not 1.0."),
    (["--blend-start", -0.1], "--blend-start must be at least 0 and below 1 (the script's 0.25), not -0.1."),
    (["--width", 100], "--width must be a positive multiple of 8"),
    (["--height", 0], "--height must be a positive multiple of 8"),
    (["--prompts-file", "missing.txt"], "Prompts file missing.txt does not exist"),
    (["--prompts-file", "comments.txt"], "Prompts file comments.txt holds no prompt; write one prompt per line."),
    (["--blend-start", "nan"], "--blend-start must be at least 0 and below 1 (the script's 0.25), not nan."),
    (["--image", "dot.png"], "dot.png is 1x1 pixels, too small to hold a concept: an image needs at least 8 pixels a side"),
])
def test_edit_sampling_option_errors_are_one_line_and_write_nothing(args, message, rich_run, scene, tmp_path, capsys, monkeypatch):
    from bas.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "comments.txt").write_text("# nothing but a comment\n\n")
    square_mask(tmp_path / "mask.png")
    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    prompt = [] if "--prompts-file" in args else ["a photo of <asset1>"]
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ["edit", rich_run, *prompt, "--image", scene / "img.png", "--mask", "mask.png", "--steps", 2,
                                "--out-dir", "e", *args]])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert not (tmp_path / "e").exists()
