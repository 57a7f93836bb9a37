"""Reading images and masks: the shared real scenes, every PNG mode, and bad masks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from bas.core.errors import BasError
from bas.core.scene import SceneInput, find_scene_files, load_image, load_mask, prepare_scene

from conftest import SHARED_SCENES

SCENES = sorted(p for p in SHARED_SCENES.glob("*") if p.is_dir()) if SHARED_SCENES.is_dir() else []


@pytest.mark.skipif(not SCENES, reason="../shared/scenes is not present")
@pytest.mark.parametrize("scene_dir", SCENES, ids=[p.name for p in SCENES])
def test_every_shared_scene_loads_with_one_object_per_mask(scene_dir):
    image_path, mask_paths = find_scene_files(scene_dir)
    assert len(mask_paths) >= 2
    raw = [load_mask(p) for p in mask_paths]
    for mask in raw:  # the grey channels of the RGBA files hold soft masks
        assert ((mask > 0.02) & (mask < 0.98)).any(), "soft edges were lost"
    scene = prepare_scene(SceneInput(load_image(image_path), raw), 512)
    assert scene.image.shape == (3, 512, 512) and -1.0 <= scene.image.min() and scene.image.max() <= 1.0
    binary = scene.masks > 0.5
    for i, mask in enumerate(binary):
        coverage = float(mask.float().mean())
        assert 0.01 < coverage < 0.5, f"mask{i} covers {coverage:.1%} of the image"
        for j in range(i + 1, len(binary)):  # different masks mark different objects
            inter = float((mask & binary[j]).sum())
            union = float((mask | binary[j]).sum())
            assert inter / union < 0.2


def square_mask(mode: str, size=(64, 64)) -> Image.Image:
    arr = np.zeros(size[::-1], dtype=np.uint8)
    arr[16:48, 8:40] = 255
    arr[16:48, 40] = 100  # one soft column
    grey = Image.fromarray(arr, "L")
    if mode == "1":
        return grey.point(lambda v: 255 if v > 200 else 0).convert("1")
    if mode == "RGB":
        return Image.merge("RGB", [grey] * 3)
    if mode == "RGBA":  # constant alpha: the mask is in the grey channels (the reference scenes)
        return Image.merge("RGBA", [grey] * 3 + [Image.new("L", grey.size, 255)])
    if mode == "RGBA-cutout":  # varying alpha: the mask is the alpha channel
        return Image.merge("RGBA", [Image.new("L", grey.size, 200)] * 3 + [grey])
    return grey


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "RGBA", "RGBA-cutout"])
def test_masks_of_any_png_mode_read_the_same(tmp_path, mode):
    path = tmp_path / "m.png"
    square_mask(mode).save(path)
    mask = load_mask(path)
    assert mask.shape == (64, 64)
    assert mask[20, 20] == 1.0 and mask[0, 0] == 0.0
    assert int((mask > 0.5).sum()) == 32 * 32
    if mode != "1":
        assert mask[20, 40] == pytest.approx(100 / 255)  # soft values kept


def test_masks_are_resized_to_the_image_and_cropped_with_it():
    image = Image.new("RGB", (200, 100), "white")
    mask = np.zeros((50, 100), dtype=np.float32)
    mask[:, 50:] = 1.0  # right half
    scene = prepare_scene(SceneInput(image, [mask]), 64)
    assert scene.masks.shape == (1, 64, 64)
    # centre crop of a 2:1 image keeps x in [50, 150): the right half of the mask is the crop's right half
    assert float(scene.masks[0, :, :30].max()) == 0.0 and float(scene.masks[0, :, 34:].min()) == 1.0


def test_mask_of_another_aspect_ratio_is_stretched_with_a_warning():
    image = Image.new("RGB", (64, 64))
    mask = np.zeros((32, 64), dtype=np.float32)
    mask[:, :20] = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_scene(SceneInput(image, [mask]), 64)
    assert any("stretched" in str(w.message) for w in caught)


@pytest.mark.parametrize("masks, message", [
    ([np.zeros((64, 64))], "is empty"),
    ([np.ones((64, 64))], "covers the whole image"),
    ([], "No masks were given"),
    ([np.eye(64)] * 9, "at most 8 concepts"),
])
def test_bad_masks_are_refused_with_the_fix(masks, message):
    with pytest.raises(BasError, match=message):
        prepare_scene(SceneInput(Image.new("RGB", (64, 64)), masks), 64)


def test_unreadable_files_are_user_errors(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(BasError, match="is not a readable image"):
        load_image(bad)
    with pytest.raises(BasError, match="is not a readable image"):
        load_mask(bad)
    with pytest.raises(BasError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(BasError, match="has no img.jpg"):
        find_scene_files(tmp_path)
