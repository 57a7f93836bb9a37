"""Mask cleanup on synthetic masks: threshold, fill holes, dilate, erode, feather, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from bas.core.errors import BasError
from bas.core.mask_cleanup import MaskCleanup, disk_max
from bas.core.masks import load_scene_input
from bas.core.plugins import Plugins
from bas.core.scene import SceneInput


def disk_footprint(radius: float) -> np.ndarray:
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= radius**2


def square(size=40, box=(10, 30, 10, 30)) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = 1.0
    return mask


def test_threshold_binarises_soft_values():
    mask = np.array([[0.0, 0.2, 0.49], [0.5, 0.7, 1.0]], np.float32)
    out = MaskCleanup(threshold=0.5).apply(mask)
    assert out.tolist() == [[0, 0, 0], [1, 1, 1]]


def test_fill_holes_fills_enclosed_pixels_and_keeps_soft_edges():
    mask = square()
    mask[15:25, 15:25] = 0.0  # a 10x10 hole
    mask[10, 10:30] = 0.3  # a soft top edge, outside the core
    out = MaskCleanup(fill_holes=True).apply(mask)
    assert out[15:25, 15:25].min() == 1.0
    assert float(out[10, 20]) == pytest.approx(0.3)
    assert int((out > 0.5).sum()) == 19 * 20  # the whole square but its soft top row
    open_ring = mask.copy()
    open_ring[15:25, 25:30] = 0.0  # the hole opens to the outside: nothing to fill
    assert np.array_equal(MaskCleanup(fill_holes=True).apply(open_ring), open_ring)


def test_dilate_grows_a_point_into_a_disk():
    mask = np.zeros((21, 21), np.float32)
    mask[10, 10] = 1.0
    out = MaskCleanup(dilate=3).apply(mask)
    assert int(out.sum()) == int(disk_footprint(3).sum()) == 29  # integer points with dx^2 + dy^2 <= 9


def test_disk_max_equals_grey_dilation_with_a_disk_on_soft_masks():
    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.random((50, 70)).astype(np.float32), 2)
    for radius in (1, 2.5, 6):
        expected = ndimage.grey_dilation(mask, footprint=disk_footprint(radius), mode="nearest")
        assert np.array_equal(disk_max(mask, radius), expected)


def test_erode_shrinks_by_the_radius_but_not_from_the_image_border():
    out = MaskCleanup(erode=2).apply(square())
    assert int(out.sum()) == 16 * 16
    border = square(box=(0, 20, 0, 40))  # touches the top, left and right borders
    out = MaskCleanup(erode=3).apply(border)
    assert out[0].min() == 1.0 and int(out.sum()) == 17 * 40


def test_dilate_then_erode_closes_a_gap():
    mask = np.zeros((30, 40), np.float32)
    mask[10:20, 5:18] = 1.0
    mask[10:20, 20:35] = 1.0  # two pixels apart
    out = MaskCleanup(dilate=2, erode=2).apply(mask)
    assert out[11:19, 18:20].min() == 1.0  # a disk rounds the gap's four corners, so not rows 10 and 19
    assert out[:10].sum() == 0 and out[20:].sum() == 0 and out[:, :5].sum() == 0 and out[:, 35:].sum() == 0


def test_distances_are_image_pixels_whatever_the_mask_resolution():
    mask = np.zeros((21, 21), np.float32)
    mask[10, 10] = 1.0
    # a mask at half the image's resolution: 6 image pixels are 3 mask pixels
    assert np.array_equal(MaskCleanup(dilate=6).apply(mask, scale=0.5), MaskCleanup(dilate=3).apply(mask))


def test_feather_softens_edges_and_keeps_the_interior():
    out = MaskCleanup(feather=2).apply(square())
    assert out[20, 20] == pytest.approx(1.0, abs=1e-3) and out[0, 0] == pytest.approx(0.0, abs=1e-3)
    edge = out[20, 8:12]
    assert ((edge > 0.02) & (edge < 0.98)).all() and np.all(np.diff(edge) > 0)
    assert out.sum() == pytest.approx(400, rel=1e-3)  # a blur moves mass, it does not add it


def test_operations_run_in_order_threshold_fill_dilate_erode_feather():
    mask = square() * 0.6
    mask[18:22, 18:22] = 0.0
    out = MaskCleanup(threshold=0.5, fill_holes=True, dilate=1, erode=1, feather=0.5).apply(mask)
    assert out[20, 20] > 0.99  # thresholded to 1, then the hole filled
    assert out.max() <= 1.0 and out.min() >= 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"mask_dilate": -1}, "--mask-dilate must be 0 or more pixels"),
    ({"mask_erode": -2}, "--mask-erode must be 0 or more pixels"),
    ({"mask_feather": -0.5}, "--mask-feather must be 0 or more pixels"),
    ({"mask_threshold": 1.5}, r"--mask-threshold must be in \(0, 1\]"),
    ({"mask_threshold": 0}, r"--mask-threshold must be in \(0, 1\]"),
])
def test_bad_cleanup_options_are_user_errors(kwargs, message):
    with pytest.raises(BasError, match=message):
        MaskCleanup.from_options(kwargs)


class FakeConfig:
    def __init__(self, **options):
        self.image = None
        self.options = options


class FixedSource:
    def __init__(self, masks, size=(40, 40)):
        self.masks, self.size = masks, size

    def load(self, config):
        return SceneInput(Image.new("RGB", self.size), self.masks, [f"m{i}" for i in range(len(self.masks))])


def test_every_source_gets_the_cleanup_and_overlapping_masks_stay_overlapping():
    a, b = square(box=(5, 25, 5, 25)) * 0.8, square(box=(15, 35, 15, 35)) * 0.8  # overlap in [15, 25)^2
    scene = load_scene_input(Plugins(), FixedSource([a, b]), FakeConfig(mask_threshold=0.5))
    assert [sorted(np.unique(m)) for m in scene.masks] == [[0.0, 1.0]] * 2  # 0.8 became 1 in both
    overlap = (scene.masks[0] > 0.5) & (scene.masks[1] > 0.5)
    assert int(overlap.sum()) == 10 * 10
    untouched = load_scene_input(Plugins(), FixedSource([a, b]), FakeConfig())
    assert untouched.masks[0] is a and untouched.masks[1] is b  # no cleanup asked: masks as the source made them


def test_a_mask_that_cleanup_erases_is_an_error_naming_it():
    thin = np.zeros((40, 40), np.float32)
    thin[10:30, 20:22] = 1.0
    with pytest.raises(BasError, match=r"m1 is empty after mask cleanup \(--mask-erode 2\); use a smaller --mask-erode"):
        load_scene_input(Plugins(), FixedSource([square(), thin]), FakeConfig(mask_erode=2.0))
