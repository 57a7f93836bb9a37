"""Reading a bas-mini image back from its pixels: background colour, and each object's colour, shape, texture.

The world is flat colours from a known palette, so no learned model is needed to judge an image:
the background is the commonest colour of the border, objects are the connected regions that
differ from it, an object's colour is the commonest palette colour of its non-white pixels, its
texture is how its white pixels are arranged (none, in full-height columns, or in spots), and its
shape is the template (circle, square, triangle) that best overlaps it inside its bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from bas.mini.world import PALETTE, SHAPES, shape_mask

NAMES = list(PALETTE)
COLOURS = np.array([PALETTE[n] for n in NAMES], dtype=np.float32)
WHITE = NAMES.index("white")
FOREGROUND_DISTANCE = 70.0  # RGB distance from the background above which a pixel belongs to an object
MIN_AREA = 20  # pixels (at 64x64); smaller regions are noise


@dataclass
class ObjectReading:
    colour: str
    shape: str
    texture: str
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

    def matches(self, colour: str | None = None, shape: str | None = None, texture: str | None = None) -> bool:
        return (colour is None or self.colour == colour) and (shape is None or self.shape == shape) and (texture is None or self.texture == texture)


@dataclass
class ImageReading:
    background: str
    objects: list[ObjectReading]

    def find(self, colour: str | None = None, shape: str | None = None, texture: str | None = None) -> ObjectReading | None:
        """The largest object with these attributes, or None."""
        found = [o for o in self.objects if o.matches(colour, shape, texture)]
        return max(found, key=lambda o: o.area) if found else None


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Index into NAMES of the nearest palette colour of each RGB pixel (..., 3)."""
    d = ((pixels[..., None, :].astype(np.float32) - COLOURS) ** 2).sum(-1)
    return d.argmin(-1)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (64, 64):
            image = image.resize((64, 64), Image.BOX)
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image, dtype=np.float32)


def read_background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """The commonest palette colour of the 2-pixel border, and the border's median RGB of that colour."""
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3), pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    idx = nearest_colours(border)
    best = np.bincount(idx, minlength=len(NAMES)).argmax()
    return NAMES[best], np.median(border[idx == best], axis=0)


def read_texture(white: np.ndarray, region: np.ndarray) -> str:
    """plain, striped (white in columns spanning the object) or dotted (white in spots)."""
    fraction = white[region].mean() if region.any() else 0.0
    if fraction < 0.08:
        return "plain"
    column_height = region.sum(axis=0)
    column_white = (white & region).sum(axis=0)
    full = (column_height > 0) & (column_white >= 0.6 * np.maximum(column_height, 1))
    in_full_columns = column_white[full].sum() / max(column_white.sum(), 1)
    return "striped" if in_full_columns > 0.5 else "dotted"


def read_shape(region: np.ndarray, box: tuple[int, int, int, int]) -> str:
    """The template with the best IoU with ``region`` inside its bounding box."""
    x0, y0, x1, y1 = box
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        template = shape_mask(shape, (x0, y0, x1, y1), size=region.shape[0]) > 0.5
        iou = (template & region).sum() / max((template | region).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def read_image(image) -> ImageReading:
    """Background and objects of a 64x64 bas-mini image (PIL image or HxWx3 array)."""
    pixels = _as_array(image)
    background, bg_rgb = read_background(pixels)
    foreground = np.sqrt(((pixels - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    foreground = ndimage.binary_closing(foreground, iterations=1) | foreground
    labels, count = ndimage.label(foreground)
    nearest = nearest_colours(pixels)
    white = nearest == WHITE
    objects = []
    for k in range(1, count + 1):
        region = ndimage.binary_fill_holes(labels == k)
        area = int(region.sum())
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(region)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        body = nearest[region & ~white]
        body = body[body != NAMES.index(background)]
        colour = NAMES[np.bincount(body, minlength=len(NAMES)).argmax()] if body.size else "white"
        objects.append(ObjectReading(colour, read_shape(region, box), read_texture(white, region), area, box))
    return ImageReading(background, sorted(objects, key=lambda o: -o.area))
