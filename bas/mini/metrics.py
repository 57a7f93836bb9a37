"""Reading a bas-mini image back from its pixels: background colour, and each object's colour, shape, texture.

The world is flat colours from a known palette, so no learned model is needed to judge an image:
the background is the commonest colour of the border, objects are the connected regions that
differ from it, an object's colour is the commonest palette colour of its non-white pixels, its
texture is how its white pixels are arranged (none, in full-height columns, or in spots), its
shape is the template (named or not: circle, square, triangle, cross, diamond) that best overlaps
it inside its bounding box, and its core (``inner``) a second colour held inside it, if any.
Objects that touch form one region; a region holding two or more colours in quantity is split
into one object per colour, each white or stray pixel going to the nearest of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from bas.mini.world import ALL_SHAPES, PALETTE, shape_mask

NAMES = list(PALETTE)
COLOURS = np.array([PALETTE[n] for n in NAMES], dtype=np.float32)
WHITE = NAMES.index("white")
FOREGROUND_DISTANCE = 70.0  # RGB distance from the background above which a pixel belongs to an object
MIN_AREA = 20  # pixels (at 64x64); smaller regions are noise
# a colour is an object of its own within a region when its core holds this share of the region's core and this many pixels
SPLIT_SHARE, SPLIT_MIN_CORE = 0.1, 25
SPLIT_MIN_RIM = 10  # ... and this many pixels on the region's outer rim: a colour enclosed by another is shading, not an object
# an enclosed colour is the object's core (a two-colour object) when this many of its pixels are within PURE of the palette colour
INNER_MIN, PURE = 12, 45.0


@dataclass
class ObjectReading:
    colour: str
    shape: str
    texture: str
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    inner: str | None = None  # the colour of its core, for a two-colour object

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


def nearest_colours(pixels: np.ndarray, distance: bool = False):
    """Index into NAMES of the nearest palette colour of each RGB pixel (..., 3); with ``distance``,
    also how far (RGB) each pixel is from it."""
    d = ((pixels[..., None, :].astype(np.float32) - COLOURS) ** 2).sum(-1)
    nearest = d.argmin(-1)
    return (nearest, np.sqrt(np.take_along_axis(d, nearest[..., None], -1)[..., 0])) if distance else nearest


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (64, 64):
            image = image.resize((64, 64), Image.BOX)
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image, dtype=np.float32)


def colour_share(image, colour: str) -> float:
    """The share of the image's pixels whose nearest palette colour is ``colour``."""
    return float((nearest_colours(_as_array(image)) == NAMES.index(colour)).mean())


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
    best, best_iou = ALL_SHAPES[0], -1.0
    for shape in ALL_SHAPES:
        template = shape_mask(shape, (x0, y0, x1, y1), size=region.shape[0]) > 0.5
        iou = (template & region).sum() / max((template | region).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def read_inner(part: np.ndarray, nearest: np.ndarray, pure: np.ndarray, main: int) -> str | None:
    """The colour of the object's core: the commonest other colour of its pure pixels away from its
    edge, when it has at least :data:`INNER_MIN` of them (blends where two colours meet are not pure)."""
    inside = part & pure & ~ndimage.binary_dilation(~part, iterations=2)
    counts = np.bincount(nearest[inside], minlength=len(NAMES))
    counts[main] = 0
    best = int(counts.argmax())
    return NAMES[best] if counts[best] >= INNER_MIN else None


def read_image(image) -> ImageReading:
    """Background and objects of a 64x64 bas-mini image (PIL image or HxWx3 array)."""
    pixels = _as_array(image)
    background, bg_rgb = read_background(pixels)
    foreground = np.sqrt(((pixels - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    foreground = ndimage.binary_closing(foreground, iterations=1) | foreground
    labels, count = ndimage.label(foreground)
    nearest, far = nearest_colours(pixels, distance=True)
    white = nearest == WHITE
    coloured = ~white & (nearest != NAMES.index(background))
    objects = []
    for k in range(1, count + 1):
        region = ndimage.binary_fill_holes(labels == k)
        if region.sum() < MIN_AREA:
            continue
        for part in split_by_colour(region, nearest, coloured):
            area = int(part.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(part)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            pure = part & coloured & (far < PURE)  # blends of a colour and white stripes or dots are often nearest grey
            body = nearest[pure] if pure.sum() >= MIN_AREA else nearest[part & coloured]
            counts = np.bincount(body, minlength=len(NAMES))
            colour = NAMES[counts.argmax()] if body.size else "white"
            objects.append(ObjectReading(colour, read_shape(part, box), read_texture(white, part), area, box,
                                         read_inner(part, nearest, coloured & (far < PURE), counts.argmax())))
    return ImageReading(background, sorted(objects, key=lambda o: -o.area))


def split_by_colour(region: np.ndarray, nearest: np.ndarray, coloured: np.ndarray) -> list[np.ndarray]:
    """``region`` as one object, or, where touching objects made it, one part per colour that holds at
    least :data:`SPLIT_SHARE` of the region's core (and :data:`SPLIT_MIN_CORE` pixels): its coloured pixels away
    from white and from the region's edge, where anti-aliasing blends colours into others (purple
    and white make pink); each such colour must also reach the region's outer rim
    (:data:`SPLIT_MIN_RIM`), since objects lie side by side and a colour inside another is shading.
    Every other pixel of the region joins the part of the nearest core pixel."""
    core = region & coloured & ~ndimage.binary_dilation(~coloured, iterations=1)
    counts = np.bincount(nearest[core], minlength=len(NAMES))
    rim = np.bincount(nearest[region & coloured & ndimage.binary_dilation(~region, iterations=2)], minlength=len(NAMES))
    major = [c for c in np.nonzero(counts)[0] if counts[c] >= max(SPLIT_MIN_CORE, SPLIT_SHARE * core.sum()) and rim[c] >= SPLIT_MIN_RIM]
    if len(major) < 2:
        return [region]
    seeds = np.zeros(region.shape, dtype=np.int64)
    for i, c in enumerate(major, start=1):
        seeds[core & (nearest == c)] = i
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix]
    parts = []
    for i in range(1, len(major) + 1):
        pieces, n = ndimage.label(region & (owner == i))
        parts += [ndimage.binary_fill_holes(pieces == j) for j in range(1, n + 1)]
    return parts
