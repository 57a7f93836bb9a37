"""COCO masks from a small annotation file written here: polygons and RLE, filters, the selector, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from bas.cli import BasGroup, add_plugin_commands, cli
from bas.core.masks import MasksConfig, load_scene_input
from bas.core.plugins import Plugins

W, H = 100, 60  # the square crop keeps x in [20, 80)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written by hand: run lengths over the column-major pixels, from 0."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": [mask.shape[0], mask.shape[1]]}


def block(y0, y1, x0, x1, h=H, w=W) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def ann(id_, image_id, category_id, segmentation, area, iscrowd=0):
    return {"id": id_, "image_id": image_id, "category_id": category_id, "segmentation": segmentation, "area": area, "iscrowd": iscrowd, "bbox": [0, 0, 1, 1]}


@pytest.fixture
def invoke_with_plugin_commands():
    """Like the `invoke` fixture, with the commands plugins add (as `bas` has), on a copy of the group."""
    from click.testing import CliRunner

    group = BasGroup(name="bas", commands=dict(cli.commands))
    add_plugin_commands(group)
    return lambda *args: CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    compressed = mask_utils.encode(np.asfortranarray(block(40, 60, 22, 40)))
    compressed["counts"] = compressed["counts"].decode()
    data = {
        "images": [
            {"id": 1, "width": W, "height": H, "file_name": "one.jpg"},
            {"id": 2, "width": W, "height": H, "file_name": "two.jpg"},  # one big thing only
            {"id": 3, "width": W, "height": H, "file_name": "three.jpg"},  # a big thing and big stuff
            {"id": 4, "width": W, "height": H, "file_name": "four.jpg"},  # two big things, one outside the crop
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}, {"id": 44, "name": "bottle"}, {"id": 149, "name": "grass"}],
        "annotations": [
            ann(10, 1, 1, [[20, 0, 60, 0, 60, 30, 20, 30]], 1200),  # polygon: x in [20, 60), y in [0, 30)
            ann(11, 1, 18, uncompressed_rle(block(30, 60, 60, 100)), 1200),  # 600 pixels inside the crop
            ann(12, 1, 3, compressed, 360),  # compressed RLE, 10% of the crop
            ann(13, 1, 1, [[70, 2, 74, 2, 74, 6, 70, 6]], 16),  # a small second person
            ann(14, 1, 1, uncompressed_rle(block(0, 60, 0, 20)), 1200, iscrowd=1),  # a crowd, outside the crop
            ann(20, 2, 1, [[20, 0, 80, 0, 80, 40, 20, 40]], 2400),
            ann(30, 3, 1, [[20, 0, 80, 0, 80, 30, 20, 30]], 1800),
            ann(31, 3, 149, [[20, 30, 80, 30, 80, 60, 20, 60]], 1800),
            ann(40, 4, 1, [[20, 0, 80, 0, 80, 30, 20, 30]], 1800),
            ann(41, 4, 18, [[0, 0, 20, 0, 20, 60, 0, 60]], 1200),  # big, but left of the crop
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    image = root / "one.jpg"
    Image.new("RGB", (W, H), "gray").save(image)
    return path, image


def coco_masks(coco, *plugin_args, **options):
    path, image = coco
    options = {"annotations": path, "image_id": 1, "categories": (), "min_area": 0.15, "include_crowd": False, **options}
    config = MasksConfig(out=Path("unused"), image=image, options=options)
    plugins = Plugins(["coco-masks"])
    return load_scene_input(plugins, plugins.choose("mask source").factory(config), config)


def test_polygon_and_rle_instances_become_masks_with_their_pixels(coco):
    scene = coco_masks(coco, min_area=0.0)
    # largest share of the crop first: person (1200), dog (600 in the crop), car (360), small person (16)
    assert [int(m.sum()) for m in scene.masks] == [1200, 1200, 360, 16]
    assert all(m.shape == (H, W) and m.dtype == np.float32 for m in scene.masks)
    person, dog, car, small = scene.masks
    assert np.array_equal(person, block(0, 30, 20, 60))  # the polygon's pixels exactly
    assert np.array_equal(dog, block(30, 60, 60, 100))  # uncompressed RLE
    assert np.array_equal(car, block(40, 60, 22, 40))  # compressed RLE
    assert scene.mask_names[0] == "COCO annotation 10 (person, 33% of the crop)"
    assert "crowd" not in " ".join(scene.mask_names) and not any(n.startswith("COCO annotation 14") for n in scene.mask_names)


def test_min_area_is_a_fraction_of_the_square_crop(coco):
    assert [int(m.sum()) for m in coco_masks(coco).masks] == [1200, 1200]  # default 0.15: car's 10% is dropped
    assert [int(m.sum()) for m in coco_masks(coco, min_area=0.05).masks] == [1200, 1200, 360]
    assert len(coco_masks(coco, min_area=0.0, include_crowd=True).masks) == 4  # the crowd lies outside the crop


def test_categories_select_and_order_the_concepts(coco):
    scene = coco_masks(coco, categories=("dog", "person"), min_area=0.0)
    assert [n.split("(")[1].split(",")[0] for n in scene.mask_names] == ["dog", "person", "person"]


def test_masks_command_writes_coco_masks_and_preview(coco, invoke, tmp_path):
    path, image = coco
    out = tmp_path / "out"
    result = invoke("masks", "--plugin", "coco-masks", "--image", image, "--annotations", path, "--image-id", 1, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["img.png", "mask0.png", "mask1.png", "preview.png"]
    assert int((np.asarray(Image.open(out / "mask1.png")) == 255).sum()) == 1200


def test_selector_lists_images_meeting_the_papers_rule(coco, invoke_with_plugin_commands):
    invoke = invoke_with_plugin_commands
    path, _ = coco
    result = invoke("coco-select", "--annotations", path)
    assert result.exit_code == 0, result.output
    # 1: person 33% and dog 17%.  2: one thing.  3: the second segment is stuff.  4: the dog is outside the crop.
    assert result.stdout.splitlines() == ["1\tone.jpg\tperson 33%, dog 17%"]
    assert "1 of 4 images have at least 2 thing segments covering 15% of the square crop each" in result.stderr
    looser = invoke("coco-select", "--annotations", path, "--min-segments", 1, "--min-fraction", 0.3).stdout.splitlines()
    assert [line.split("\t")[0] for line in looser] == ["1", "2", "3", "4"]
    sampled = invoke("coco-select", "--annotations", path, "--min-segments", 1, "--sample", 2, "--seed", 1)
    assert len(sampled.stdout.splitlines()) == 2 and "printed 2 of them" in sampled.stderr


@pytest.mark.parametrize("args, message", [
    (["--image-id", 7], r"Image id 7 is not in .*instances.json; pass one of its 4 image ids \(such as 1, 2, 3, 4\)"),
    (["--image-id", 1, "--category", "bottle"], r"Image 1 has no 'bottle' instance; its categories are: car, dog, person\."),
    (["--image-id", 1, "--category", "unicorn"], r"Category 'unicorn' is not in .*; use one of its category names"),
    (["--image-id", 1, "--min-area", 0.5], r"No instance of image 1 covers at least 50% of the square crop \(the largest, a person, covers 33.3%\); lower --min-area"),
    (["--image-id", 1, "--min-area", 1.5], r"--min-area is a fraction of the square crop in \[0, 1\)"),
    ([], r"coco-masks needs --annotations FILE .* and --image-id ID"),
])
def test_bad_coco_input_is_one_error_and_writes_nothing(coco, invoke, tmp_path, args, message):
    path, image = coco
    out = tmp_path / "out"
    annotations = ["--annotations", path] if args else []
    result = invoke("masks", "--plugin", "coco-masks", "--image", image, *annotations, *args, "--out", out)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output), result.output
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ("not json at all", "is not a COCO annotation file (not JSON"),
    ('[{"id": 1}]', "is not a COCO annotation file (no 'images' list)"),
    ('{"images": [], "annotations": [], "info": {}}', "is not a COCO annotation file (no 'categories' list)"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "an entry of 'images' lacks one of id, width, height"),
])
def test_a_file_that_is_not_coco_json_is_refused(tmp_path, invoke_with_plugin_commands, coco, content, message):
    invoke = invoke_with_plugin_commands
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    _, image = coco
    result = invoke("masks", "-p", "coco-masks", "--image", image, "--annotations", bad, "--image-id", 1, "--out", tmp_path / "out")
    assert result.exit_code == 1 and message in result.output
    assert "pass a COCO instances_*.json with --annotations" in result.output
    selector = invoke("coco-select", "--annotations", bad)
    assert selector.exit_code == 1 and message in selector.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("width", 0), ("height", 0), ("height", -3)])
def test_an_image_entry_without_a_size_is_named_not_its_valid_polygon(tmp_path, invoke_with_plugin_commands, coco, field, value):
    invoke = invoke_with_plugin_commands
    path, image = coco
    data = json.loads(Path(path).read_text())
    data["images"][0][field] = value
    bad = tmp_path / "sized.json"
    bad.write_text(json.dumps(data))
    expected = f"gives image 1 the {field} {value!r}; an image's width and height are its size in pixels, whole numbers above 0"
    for args in (["masks", "-p", "coco-masks", "--image", image, "--annotations", bad, "--image-id", 1, "--out", tmp_path / "out"],
                 ["coco-select", "--annotations", bad, "--min-segments", 1]):
        result = invoke(*args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_an_image_of_another_shape_than_annotated_is_refused(coco, tmp_path, invoke):
    path, _ = coco
    wrong = tmp_path / "wrong.png"
    Image.new("RGB", (50, 50)).save(wrong)
    result = invoke("masks", "-p", "coco-masks", "--image", wrong, "--annotations", path, "--image-id", 1, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "is 50x50 but image 1 in" in result.output and "one.jpg" in result.output


def test_instances_left_out_are_reported_with_the_way_to_keep_them(coco, tmp_path):
    import subprocess
    import sys
    import warnings

    with pytest.warns(UserWarning) as record:
        coco_masks(coco)
    assert [str(w.message) for w in record] == [
        "coco-masks left out 2 instances of image 1 covering less than 15% of the square crop (car 10.0%, person 0.4%); "
        "pass --min-area 0 to keep them."]
    with pytest.warns(UserWarning) as record:
        coco_masks(coco, image_id=4, min_area=0.0)
    assert [str(w.message) for w in record] == ["coco-masks 1 more (dog) lies outside the square crop."]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out: nothing said
        coco_masks(coco, min_area=0.0)

    path, image = coco  # as a user sees it: one line on stderr
    proc = subprocess.run([sys.executable, "-m", "bas.cli", "masks", "--plugin", "coco-masks", "--image", str(image), "--annotations", str(path),
                           "--image-id", "1", "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["Warning: coco-masks left out 2 instances of image 1 covering less than 15% of the square crop (car 10.0%, person 0.4%); "
                                        "pass --min-area 0 to keep them."]


@pytest.mark.parametrize("key, field, value, message", [
    ("annotations", "area", "big", "the 'area' of annotations entry 10 is 'big', not a number"),
    ("images", "width", "64", "the 'width' of images entry 1 is '64', not a whole number"),
])
def test_coco_numbers_that_are_strings_are_one_error(key, field, value, message, coco, tmp_path, invoke_with_plugin_commands):
    path, image = coco
    data = json.loads(path.read_text())
    data[key][0][field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    for args in (["coco-select", "--annotations", bad], ["masks", "-p", "coco-masks", "--image", image, "--annotations", bad, "--image-id", 1, "--out", tmp_path / "out"]):
        result = invoke_with_plugin_commands(*args)
        assert result.exit_code == 1 and message in result.output and result.output.count("Error:") == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]
