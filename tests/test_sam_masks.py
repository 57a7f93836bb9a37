"""SAM masks through a tiny random SamModel saved here: prompts reach the model, masks come back at the
image's size, automatic mode, and every bad input (offline: HF_HUB_OFFLINE=1 from conftest)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from bas.core.plugins import Plugins
from bas.plugins.sam_masks import AUTO_SAME_SEGMENT, distinct_largest

from conftest import save_tiny_sam  # noqa: E402

W, H = 80, 48  # the tiny processor resizes the longest side to 64: x * 0.8, y * 38 / 48


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny-sam")


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam-image") / "img.png"
    Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def model_calls(monkeypatch):
    """The prompts of every SamModel forward call, as the model receives them."""
    from transformers import SamModel

    calls, forward = [], SamModel.forward

    def spy(self, *args, **kwargs):
        calls.append({k: kwargs[k].detach().cpu().clone() for k in ("input_points", "input_labels", "input_boxes") if kwargs.get(k) is not None})
        calls[-1]["multimask"] = kwargs["multimask_output"]
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SamModel, "forward", spy)
    return calls


def to_model(x, y):
    return [x * 64 / 80, y * 38 / 48]


def test_prompts_reach_the_model_and_masks_come_back_at_the_images_size(tiny_sam, picture, model_calls, invoke, tmp_path):
    out = tmp_path / "masks"
    result = invoke("masks", "--plugin", "sam-masks", "--model", tiny_sam, "--image", picture, "--device", "cpu",
                    "--point", "10,20+30,5", "--point", "70,40", "--box", "5,5,40,30", "--out", out)
    assert result.exit_code == 0, result.output
    assert len(model_calls) == 3  # one decoder call per concept; the image is embedded once, outside forward
    grouped, single, box = model_calls
    assert torch.allclose(grouped["input_points"].float(), torch.tensor([[[to_model(10, 20), to_model(30, 5)]]]))
    assert grouped["input_labels"].tolist() == [[[1, 1]]] and grouped["multimask"] is False  # two points: one object
    assert torch.allclose(single["input_points"].float(), torch.tensor([[[to_model(70, 40)]]])) and single["multimask"] is True
    assert torch.allclose(box["input_boxes"].float(), torch.tensor([[to_model(5, 5) + to_model(40, 30)]])) and box["multimask"] is False
    assert sorted(p.name for p in out.iterdir()) == ["img.png", "mask0.png", "mask1.png", "mask2.png", "preview.png"]
    for i in range(3):
        mask = np.asarray(Image.open(out / f"mask{i}.png"))
        assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255} and (mask == 255).any()
    preview = np.asarray(Image.open(out / "preview.png").convert("RGB"), dtype=np.int16)
    assert preview.shape == (H, W, 3) and np.abs(preview - np.asarray(Image.open(picture), dtype=np.int16)).mean() > 10


def test_negative_points_and_a_box_refined_by_points_reach_the_model(tiny_sam, picture, model_calls, invoke, tmp_path):
    out = tmp_path / "masks"
    result = invoke("masks", "--plugin", "sam-masks", "--model", tiny_sam, "--image", picture, "--device", "cpu",
                    "--point", "10,20+no:30,5", "--box", "5,5,40,30+no:20,10+12,12", "--out", out)
    assert result.exit_code == 0, result.output
    point, box = model_calls
    assert torch.allclose(point["input_points"].float(), torch.tensor([[[to_model(10, 20), to_model(30, 5)]]]))
    assert point["input_labels"].tolist() == [[[1, 0]]] and point["multimask"] is False
    assert torch.allclose(box["input_boxes"].float(), torch.tensor([[to_model(5, 5) + to_model(40, 30)]]))
    assert torch.allclose(box["input_points"].float(), torch.tensor([[[to_model(20, 10), to_model(12, 12)]]]))
    assert box["input_labels"].tolist() == [[[0, 1]]] and box["multimask"] is False
    assert sorted(p.name for p in out.iterdir()) == ["img.png", "mask0.png", "mask1.png", "preview.png"]


def test_automatic_mode_gives_the_largest_distinct_segments_of_a_point_grid(tiny_sam, picture, model_calls, invoke, tmp_path):
    out = tmp_path / "auto"
    result = invoke("masks", "-p", "sam-masks", "--model", tiny_sam, "--image", picture, "--auto", 2, "--auto-grid", 4,
                    "--auto-min-score", -1, "--out", out)
    assert result.exit_code == 0, result.output
    grid = model_calls[0]
    expected = [to_model((i + 0.5) * W / 4, (j + 0.5) * H / 4) for j in range(4) for i in range(4)]
    assert torch.allclose(grid["input_points"].float(), torch.tensor([[[p] for p in expected]])) and grid["multimask"] is True
    assert len(model_calls) == 1 + 2  # the grid in one batch, then each chosen segment decoded again at full size
    a, b = (np.asarray(Image.open(out / f"mask{i}.png")) > 127 for i in range(2))
    assert a.sum() >= b.sum() > 0 and (a & b).sum() < AUTO_SAME_SEGMENT * b.sum()
    too_many = invoke("masks", "-p", "sam-masks", "--model", tiny_sam, "--image", picture, "--auto", 6, "--auto-grid", 4,
                      "--auto-min-score", -1, "--out", tmp_path / "six")
    assert too_many.exit_code == 1 and re.search(r"SAM found \d distinct segment\(s\) but --auto asked for 6", too_many.output)
    assert not (tmp_path / "six").exists()


def test_distinct_largest_skips_background_low_scores_and_parts_of_chosen_segments():
    def box(y0, y1, x0, x1):
        mask = np.zeros((20, 20), bool)
        mask[y0:y1, x0:x1] = True
        return mask

    masks = np.stack([
        box(0, 20, 0, 19),  # 95% of the image: background
        box(0, 10, 0, 10),  # 100 px
        box(0, 6, 0, 10),  # 60 px, all inside the previous one: a part
        box(12, 20, 0, 8),  # 64 px, distinct
        box(10, 20, 10, 20),  # 100 px but scored low
        box(6, 13, 6, 13),  # 49 px, 16 of them inside the first chosen: distinct enough
    ])
    scores = np.array([0.99, 0.9, 0.9, 0.9, 0.1, 0.9])
    assert distinct_largest(masks, scores, 2, 0.5) == [1, 3]
    assert distinct_largest(masks, scores, 5, 0.5) == [1, 3, 5]
    assert distinct_largest(masks, scores, 5, 0.0) == [1, 4, 3, 5]


def test_run_takes_sam_prompts_directly(tiny_sam, tiny_model, tmp_path, invoke):
    image = tmp_path / "square.png"
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "run"
    # this test is about the masks: observers (progress, reports, checkpoints) stay off to keep it fast
    observers = sorted({e.plugin for e in Plugins().registry("observer").entries.values()})
    result = invoke("run", "--plugin", "lora", "--plugin", "sam-masks", "--image", image, "--point", "10,20", "--box", "30,30,60,60",
                    "--sam-model", tiny_sam, "--model", tiny_model, "--mask-threshold", 0.5, "--out", out,
                    "--phase1-steps", 1, "--phase2-steps", 1, "--device", "cpu", *[f"--plugin=no:{name}" for name in observers])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    assert info["masks"] == ["SAM point 10,20", "SAM box 30,30,60,60"] and info["handles"] == ["<asset0>", "<asset1>"]
    assert info["config"]["options"]["sam_model"] == str(tiny_sam) and info["model"] == str(tiny_model)


def test_help_shows_the_source_options_where_they_apply(invoke):
    masks_help = invoke("masks", "--plugin", "sam-masks", "--help").output
    assert "--point" in masks_help and "--auto" in masks_help and "--mask-dilate" in masks_help
    assert "--lora-rank" not in masks_help and "--quiet" not in masks_help  # training options stay in `bas run`
    run_help = invoke("run", "--plugin", "sam-masks", "--help").output
    assert "--sam-model" in run_help and "--point" in run_help
    assert "--point" not in invoke("run", "--help").output


def sam2_checkpoint(path):
    from transformers import Sam2Config

    Sam2Config().save_pretrained(path)
    return path


def non_sam_checkpoint(path):
    from transformers import CLIPTextConfig

    CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(path)
    return path


def model_without_processor(path, tiny_sam):
    from transformers import SamModel

    SamModel.from_pretrained(tiny_sam).save_pretrained(path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--point", "80,10"], r"Point 80,10 of --point 80,10 is outside the image \(80x48\); give x in \[0, 80\) and y in \[0, 48\)"),
    (["--point", "5,5+5,-1"], r"Point 5,-1 of --point 5,5\+5,-1 is outside the image"),
    (["--point", "no:5,5"], r"--point no:5,5 has only negative \(no:\) points; give at least one point on the concept"),
    (["--box", "5,5,40,30+90,5"], r"Point 90,5 of --box 5,5,40,30\+90,5 is outside the image"),
    (["--box", "40,5,10,30"], r"--box 40,5,10,30 has x1 < x0; give X0,Y0,X1,Y1 with the top-left corner first"),
    (["--box", "0,0,81,10"], r"--box 0,0,81,10 reaches outside the image \(80x48\)"),
    (["--point", "12"], r"--point takes X,Y \(join the points of one concept with \+, as 120,340\+150,360; no:X,Y is a point off it\) in image pixels, not '12'"),
    ([], r"sam-masks needs a prompt per concept: --point X,Y or --box X0,Y0,X1,Y1"),
    (["--auto", 2, "--point", "1,1"], r"give either --auto N or --point/--box prompts, not both"),
    (["--point", "1,1", "--mask", "m.png"], r"--mask belongs to the 'files' mask source, but the masks come from 'sam-masks'"),
    (["--point", "1,1", "--mask-erode", -1], r"--mask-erode must be 0 or more pixels"),
])
def test_bad_prompts_are_one_error_and_write_nothing(tiny_sam, picture, invoke, tmp_path, args, message):
    out = tmp_path / "out"
    result = invoke("masks", "--plugin", "sam-masks", "--model", tiny_sam, "--image", picture, *args, "--out", out)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output), result.output
    assert not out.exists()


@pytest.mark.parametrize("make, message", [
    (lambda tmp, sam: "bas-tests/no-such-sam", r"SAM checkpoint 'bas-tests/no-such-sam' is not in the Hugging Face cache .* `hf download bas-tests/no-such-sam`"),
    (lambda tmp, sam: str(tmp / "missing"), r"SAM checkpoint folder .*missing does not exist; .*`hf download facebook/sam-vit-base --local-dir DIR`"),
    (lambda tmp, sam: tmp, r"is not a SAM checkpoint folder \(it has no config.json\)"),
    (lambda tmp, sam: non_sam_checkpoint(tmp / "clip"), r"holds a 'clip_text_model' model, not Segment Anything; pass a SAM checkpoint such as facebook/sam-vit-base"),
    (lambda tmp, sam: model_without_processor(tmp / "bare", sam), r"has no SAM processor files"),
])
def test_a_checkpoint_that_cannot_be_loaded_says_how_to_get_one(tiny_sam, picture, invoke, tmp_path, make, message):
    out = tmp_path / "out"
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    result = invoke("masks", "-p", "sam-masks", "--model", make(checkpoint_dir, tiny_sam), "--image", picture, "--point", "1,1", "--out", out)
    assert result.exit_code == 1 and re.search(message, result.output), result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_sam2_without_torchvision_says_what_to_install(picture, invoke, tmp_path):
    pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed, so SAM 2 checkpoints load")
    result = invoke("masks", "-p", "sam-masks", "--model", sam2_checkpoint(tmp_path / "sam2"), "--image", picture, "--point", "1,1", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "SAM 2 checkpoints need torchvision" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_sam_runs_on_the_gpu_like_on_the_cpu(tiny_sam, picture, invoke, tmp_path):
    masks = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        result = invoke("masks", "-p", "sam-masks", "--model", tiny_sam, "--image", picture, "--point", "10,20", "--box", "5,5,40,30", "--device", device, "--out", out)
        assert result.exit_code == 0, result.output
        masks[device] = [np.asarray(Image.open(out / f"mask{i}.png")) for i in range(2)]
    agreement = [float((a == b).mean()) for a, b in zip(masks["cpu"], masks["cuda"])]
    assert min(agreement) > 0.99
