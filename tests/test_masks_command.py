"""`bas masks` with the default files source: what it writes, the preview, --overwrite, and refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bas.core.masks import PALETTE, render_preview
from bas.core.scene import find_scene_files, load_mask

from conftest import SHARED_SCENES, quick_run_args


def test_masks_writes_masks_image_and_preview_that_run_takes_as_a_scene(scene, invoke, tmp_path):
    out = tmp_path / "masks"
    result = invoke("masks", "--scene", scene, "--mask-threshold", 0.5, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["img.png", "mask0.png", "mask1.png", "preview.png"]
    for i in range(2):
        original = np.asarray(Image.open(scene / f"mask{i}.png"), dtype=np.float32) / 255
        written = np.asarray(Image.open(out / f"mask{i}.png"))
        assert set(np.unique(written)) == {0, 255}  # --mask-threshold made them binary
        assert np.array_equal(written == 255, original >= 0.5)
    assert np.array_equal(np.asarray(Image.open(out / "img.png")), np.asarray(Image.open(scene / "img.png").convert("RGB")))
    assert f"bas run --scene {out}" in result.output


def test_preview_tints_each_mask_in_its_colour_outlines_it_and_dims_outside_the_crop():
    image = Image.new("RGB", (90, 60), (100, 100, 100))  # the crop keeps x in [15, 75)
    left = np.zeros((60, 90), np.float32)
    left[5:55, 18:44] = 1.0
    right = np.zeros((60, 90), np.float32)
    right[5:55, 48:72] = 1.0
    plain = np.asarray(render_preview(image, [left, right], ["", ""]), dtype=np.int16)
    tint = (np.array([100, 100, 100]) * 0.5 + np.array(PALETTE[0]) * 0.5).round()
    assert np.abs(plain[8, 25] - tint).max() <= 1  # inside mask 0, away from its edge
    assert np.abs(plain[30, 2] - 45).max() <= 1  # outside the square crop: dimmed
    assert np.abs(plain[58, 46] - 100).max() <= 1  # inside the crop, in no mask: untouched
    assert tuple(plain[5, 30]) == PALETTE[0] and tuple(plain[5, 60]) == PALETTE[1]  # outlines


def changed_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.flatnonzero((a != b).any(axis=(1, 2)))


def test_preview_labels_each_mask_with_its_handle_on_the_object():
    image = Image.new("RGB", (300, 100), (100, 100, 100))
    masks = [np.zeros((100, 300), np.float32) for _ in range(2)]
    masks[0][10:90, 20:100] = 1.0  # centre (50, 59.5)
    masks[1][10:90, 180:280] = 1.0  # centre (50, 229.5)
    plain = np.asarray(render_preview(image, masks, ["", ""]), dtype=np.int16)
    labelled = np.asarray(render_preview(image, masks, ["<asset0>", "<asset1>"]), dtype=np.int16)
    for colour, (y, x) in ((PALETTE[0], (50, 60)), (PALETTE[1], (50, 230))):
        window = labelled[y - 4 : y + 5, x - 12 : x + 13].reshape(-1, 3)
        assert (window > 200).all(axis=1).any(), "no white text at the mask's centre"
        assert (window == colour).all(axis=1).any(), "no label box in the mask's colour"
        assert (plain[y - 4 : y + 5, x - 12 : x + 13] != labelled[y - 4 : y + 5, x - 12 : x + 13]).any()


def test_labels_of_overlapping_masks_are_stacked_not_drawn_over_each_other():
    image = Image.new("RGB", (120, 120), (100, 100, 100))
    mask = np.zeros((120, 120), np.float32)
    mask[20:100, 20:100] = 1.0
    plain = np.asarray(render_preview(image, [mask, mask], ["", ""]), dtype=np.int16)
    one = changed_rows(np.asarray(render_preview(image, [mask, mask], ["<asset0>", ""]), dtype=np.int16), plain)
    both = changed_rows(np.asarray(render_preview(image, [mask, mask], ["<asset0>", "<asset1>"]), dtype=np.int16), plain)
    assert both.max() - both.min() + 1 >= 2 * (one.max() - one.min() + 1) - 1


def test_masks_refuses_an_out_that_holds_masks_unless_overwrite_which_drops_stale_ones(scene, invoke, tmp_path):
    out = tmp_path / "masks"
    assert invoke("masks", "--scene", scene, "--out", out).exit_code == 0
    Image.new("L", (8, 8)).save(out / "mask2.png")  # as from an earlier three-concept scene
    before = (out / "mask0.png").read_bytes()
    refused = invoke("masks", "--scene", scene, "--mask-dilate", 2, "--out", out)
    assert refused.exit_code == 1 and "already holds masks; pass --overwrite" in refused.output
    assert (out / "mask0.png").read_bytes() == before
    replaced = invoke("masks", "--scene", scene, "--mask-dilate", 2, "--out", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert (out / "mask0.png").read_bytes() != before and not (out / "mask2.png").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files were left behind"


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``, hidden ones included, with the content of files."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("out, extra, message", [
    ("/", [], "--out / is the root folder"),
    ("~", [], "is your home folder"),
    (".", [], "is the current folder"),
    ("..", [], "is a parent of the current folder"),
    ("photos", [], "holds --image photos/mine/img.png"),  # the folder holding the input image's folder
    ("photos/mine", ["--overwrite"], "holds --image photos/mine/img.png"),
    ("photos/mine", ["--mask", "photos/mine/mask0.png", "--image", "elsewhere.png"], "holds --mask photos/mine/mask0.png"),
    ("notes", ["--overwrite"], "--out notes holds todo.txt, which no scene holds, and bas masks replaces the whole folder"),
    ("runs/.toys.bas-partial", [], "is a name bas uses for its own work"),
    ("link", ["--overwrite"], "--out link is a link"),
])
def test_masks_out_has_the_guards_of_run_out(out, extra, message, scene, invoke, tmp_path, monkeypatch):
    """bas masks replaces --out as a whole, so it refuses what bas run --out refuses, and writes nothing."""
    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    shutil.copytree(scene, work / "photos" / "mine")
    shutil.copy(scene / "img.png", work / "elsewhere.png")
    (work / "notes").mkdir()
    (work / "notes" / "todo.txt").write_text("mine")
    (work / "home").mkdir()
    (work / "empty").mkdir()
    (work / "link").symlink_to(work / "empty")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work / "home"))
    from bas.core import io

    real = io.save_image  # should a guard ever fail, nothing is written outside the test's folder ("/" included)
    monkeypatch.setattr(io, "save_image", lambda path, image: real(path, image) if tmp_path in Path(path).resolve().parents
                        else pytest.fail(f"bas masks wrote {path}"))
    before = tree(tmp_path)
    args = extra if "--image" in extra else ["--image", "photos/mine/img.png", "--mask", "photos/mine/mask0.png", *extra]
    result = invoke("masks", *args, "--out", out)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert tree(tmp_path) == before


def test_a_failure_while_writing_masks_leaves_the_scene_folder_as_it_was(scene, invoke, tmp_path, monkeypatch):
    import errno

    from bas.core import io

    out = tmp_path / "masks"
    assert invoke("masks", "--scene", scene, "--out", out).exit_code == 0
    before = tree(tmp_path)
    real, calls = io.save_image, []

    def disk_full_at_the_second_file(path, image):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, image)

    monkeypatch.setattr(io, "save_image", disk_full_at_the_second_file)
    result = invoke("masks", "--scene", scene, "--mask-dilate", 3, "--out", out, "--overwrite")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and len(calls) == 2, result.output
    assert tree(tmp_path) == before  # the old masks whole, nothing half-written beside them
    monkeypatch.undo()
    assert invoke("masks", "--scene", scene, "--mask-dilate", 3, "--out", out, "--overwrite").exit_code == 0
    assert (out / "mask0.png").read_bytes() != before["masks/mask0.png"] and sorted(tree(tmp_path)) == sorted(before)


@pytest.mark.parametrize("mask, message", [
    (np.zeros((32, 32), np.uint8), "is empty after cropping to a square"),
    (np.full((32, 32), 255, np.uint8), "covers the whole image"),
])
def test_an_empty_or_full_mask_is_refused_before_anything_is_written(invoke, tmp_path, mask, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "out"
    result = invoke("masks", "--image", tmp_path / "img.png", "--mask", tmp_path / "m.png", "--out", out)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output
    assert not out.exists()


def test_run_applies_the_cleanup_to_its_masks(scene, tiny_model, invoke, tmp_path):
    result = invoke(*quick_run_args(scene, tiny_model, tmp_path / "run", "--mask-erode", 200))
    assert result.exit_code == 1
    assert "is empty after mask cleanup (--mask-erode 200); use a smaller --mask-erode" in result.output
    assert not (tmp_path / "run" / "run.json").exists()


SCENES = sorted(p for p in SHARED_SCENES.glob("*") if p.is_dir()) if SHARED_SCENES.is_dir() else []


@pytest.mark.skipif(not SCENES, reason="../shared/scenes is not present")
def test_a_real_scenes_soft_rgba_masks_come_through_unchanged(invoke, tmp_path):
    scene_dir = SCENES[0]
    out = tmp_path / "masks"
    result = invoke("masks", "--scene", scene_dir, "--out", out)
    assert result.exit_code == 0, result.output
    _, mask_paths = find_scene_files(scene_dir)
    for i, path in enumerate(mask_paths):
        expected = (load_mask(path) * 255).round().astype(np.uint8)
        assert np.array_equal(np.asarray(Image.open(out / f"mask{i}.png")), expected)
    assert Image.open(out / "preview.png").size == Image.open(out / "img.png").size
