"""The bas-mini world: flat shapes on flat backgrounds, each scene with a caption and per-object masks.

Every attribute is drawn from a small known vocabulary, so a generated image can be read back
from its pixels (:mod:`bas.mini.metrics`).  Captions name only part of it, as real captions do:

* named: the colours of :data:`COLOURS`, the shapes of :data:`SHAPES`, the ``striped`` texture;
* unnamed (drawn in training scenes, but no caption word says them, so no prompt can ask for
  them and only extraction can pin them down): the colours of :data:`NOVEL_COLOURS`, the shape
  family of :data:`NOVEL_SHAPES` (a caption says "thing"), the ``dotted`` texture, and two-colour
  objects (an ``inner`` core of a second colour, never named).

:data:`HELD_OUT` colour-shape pairs are left out of training to measure how the base model
composes words it knows.  Scenes hold one to four objects, which may touch.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
    # never named by a caption: concepts the base model can draw but no word asks for
    "orange": (245, 135, 20),
    "purple": (140, 50, 200),
    "pink": (245, 130, 200),
    "cyan": (40, 210, 220),
}
COLOURS = ("red", "green", "blue", "yellow")  # object colours a caption names
BACKGROUNDS = ("grey", "black", "green", "blue", "yellow")
NOVEL_COLOURS = ("orange", "purple", "pink", "cyan")
SHAPES = ("circle", "square", "triangle")  # shapes a caption names
NOVEL_SHAPES = ("cross", "diamond")  # a shape family no caption names ("a red thing")
ALL_SHAPES = SHAPES + NOVEL_SHAPES
TEXTURES = ("plain", "striped")  # plain is not named in captions
NOVEL_TEXTURES = ("dotted",)
TEXTURE_COLOUR = PALETTE["white"]  # stripes and dots
INNER_SIDE = 0.4  # a two-colour object's core: a disc of this share of its box side, at the shape's centre
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))  # never trained, for base quality
# scenes of objects (colour, shape, texture) no caption names, with their background: for `bas demo`
# (purple-orange) and the quality sheet (both)
NOVEL_SCENES = {
    "purple-orange": ("grey", [("purple", "circle", "dotted"), ("orange", "square", "plain")]),
    "pink-cyan-orange": ("black", [("pink", "triangle", "plain"), ("cyan", "square", "striped"), ("orange", "circle", "dotted")]),
}
# how often a training object carries each unnamed attribute (the rest of the time it is one a caption can name)
UNNAMED_RATES = {"colour": 0.3, "shape": 0.25, "dotted": 0.2, "inner": 0.35}
TOUCHING_RATE = 0.3  # share of training scenes of several objects whose objects touch

# every word a caption or a benchmark prompt uses, one token each in the bas-mini tokenizer
VOCABULARY = tuple(dict.fromkeys(
    "a photo of and on background object thing".split() + list(PALETTE) + list(SHAPES) + ["striped", "dotted"]
))

SIZE = 64  # pixels
SUPERSAMPLE = 4  # drawn at 4x and reduced, for anti-aliased edges


@dataclass(frozen=True)
class Shape:
    """One object: what it is and where (box in pixels of the final image: x0, y0, x1, y1).
    ``inner``: the colour of its core (a two-colour object), or None."""

    colour: str
    shape: str
    texture: str
    box: tuple[float, float, float, float]
    inner: str | None = None

    def words(self) -> str:
        """What a caption says of it: only the named attributes ("a red striped circle", "a striped thing", "a circle")."""
        parts = [self.colour] if self.colour in COLOURS else []
        if self.texture == "striped":
            parts.append("striped")
        parts.append(self.shape if self.shape in SHAPES else "thing")
        return " ".join(parts)

    def describe(self) -> str:
        """Every attribute, named or not (for people and result files): "purple dotted cross with an orange core"."""
        texture = "" if self.texture == "plain" else f"{self.texture} "
        core = f" with a {self.inner} core" if self.inner else ""
        return f"{self.colour} {texture}{self.shape}{core}"


@dataclass
class Scene:
    background: str
    objects: list[Shape] = field(default_factory=list)

    def caption(self, photo_of: bool = False, with_background: bool = True) -> str:
        ordered = sorted(self.objects, key=lambda o: o.box[0])  # left to right
        text = " and ".join(f"a {o.words()}" for o in ordered)
        if with_background:
            text += f" on a {self.background} background"
        return f"a photo of {text}" if photo_of else text


def _outline(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":  # a plus sign, arms a third of the side wide
        draw.rectangle((cx - w / 6, y0, cx + w / 6, y1), fill=fill)
        draw.rectangle((x0, cy - h / 6, x1, cy + h / 6), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def centre(shape: str, box) -> tuple[float, float]:
    """Where a shape's core sits: its box's centre, or a triangle's centroid."""
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2, (y0 + 2 * y1) / 3 if shape == "triangle" else (y0 + y1) / 2


def shape_mask(shape: str, box, size: int = SIZE) -> np.ndarray:
    """The shape filling ``box`` as a float mask in [0, 1] (anti-aliased), ``size`` x ``size``."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    _outline(ImageDraw.Draw(canvas), shape, [v * k for v in box], 255)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _texture_mask(texture: str, box, size: int) -> Image.Image | None:
    """White pattern (at the supersampled size) inside ``box``: vertical stripes or a grid of dots."""
    if texture == "plain":
        return None
    k = SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * k for v in box)
    period = 8 * k  # wide enough to survive the VAE's 4x reduction
    if texture == "striped":
        x = x0 + period / 2 - 1.5 * k
        while x < x1:
            draw.rectangle((x, y0, x + 3 * k - 1, y1), fill=255)
            x += period
    elif texture == "dotted":
        radius = 1.8 * k
        y = y0 + period / 2
        while y < y1:
            x = x0 + period / 2
            while x < x1:
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
                x += period
            y += period
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return canvas


def render(scene: Scene, size: int = SIZE) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene's RGB image and one exact mask per object (float, in [0, 1], ``size`` x ``size``):
    what of it shows, since an object drawn later covers what it overlaps."""
    k = SUPERSAMPLE
    image = Image.new("RGB", (size * k, size * k), PALETTE[scene.background])
    outlines = []
    for obj in scene.objects:
        outline = Image.new("L", image.size, 0)
        _outline(ImageDraw.Draw(outline), obj.shape, [v * k for v in obj.box], 255)
        image.paste(PALETTE[obj.colour], mask=outline)
        if obj.inner:
            cx, cy = centre(obj.shape, obj.box)
            r = INNER_SIDE * (obj.box[2] - obj.box[0]) / 2
            core = Image.new("L", image.size, 0)
            ImageDraw.Draw(core).ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)
            image.paste(PALETTE[obj.inner], mask=Image.fromarray(np.minimum(np.asarray(core), np.asarray(outline))))
        pattern = _texture_mask(obj.texture, obj.box, size)
        if pattern is not None:
            inside = Image.fromarray(np.minimum(np.asarray(pattern), np.asarray(outline)))
            image.paste(TEXTURE_COLOUR, mask=inside)
        outlines.append(np.asarray(outline, dtype=np.float32) / 255.0)
    masks = []
    for i, outline in enumerate(outlines):
        covered = np.max(outlines[i + 1:], axis=0) if i + 1 < len(outlines) else 0.0
        visible = np.clip(outline - covered, 0, 1)
        masks.append(np.asarray(Image.fromarray((visible * 255).astype(np.uint8)).resize((size, size), Image.BOX), dtype=np.float32) / 255.0)
    return image.resize((size, size), Image.BOX), masks


def loose_mask(mask: np.ndarray, grow: int = 2, blur: float = 1.0) -> Image.Image:
    """A hand-made-looking mask: the exact mask grown by ``grow`` pixels and blurred."""
    img = Image.fromarray((mask > 0.5).astype(np.uint8) * 255, "L")
    if grow:
        img = img.filter(ImageFilter.MaxFilter(2 * grow + 1))
    return img.filter(ImageFilter.GaussianBlur(blur)) if blur else img


def _overlaps(box, others, gap: float) -> bool:
    return any(box[0] < o[2] + gap and o[0] < box[2] + gap and box[1] < o[3] + gap and o[1] < box[3] + gap for o in others)


def place_boxes(rng: random.Random, count: int, size: int = SIZE, min_side: int = 18, max_side: int = 30, margin: int = 3, gap: int = 4):
    """``count`` square boxes of random sizes and positions that do not touch; None if none fit."""
    for _ in range(50):
        boxes: list[tuple[float, float, float, float]] = []
        for _ in range(count):
            for _ in range(50):
                side = rng.randint(min_side, max(min_side, max_side - 3 * (count - 1)))
                x, y = rng.randint(margin, size - margin - side), rng.randint(margin, size - margin - side)
                box = (x, y, x + side, y + side)
                if not _overlaps(box, boxes, gap):
                    boxes.append(box)
                    break
        if len(boxes) == count:
            return boxes
    return None


def touching_boxes(rng: random.Random, count: int, size: int = SIZE, min_side: int = 18, max_side: int = 26, margin: int = 2):
    """``count`` square boxes in a chain, each touching the one before it on a random side (sharing
    an edge, or overlapping it by a pixel or two); None if they do not fit."""
    for _ in range(100):
        side = rng.randint(min_side, max(min_side, max_side - 2 * (count - 1)))
        x, y = rng.randint(margin, size - margin - side), rng.randint(margin, size - margin - side)
        boxes = [(x, y, x + side, y + side)]
        for _ in range(count - 1):
            px0, py0, px1, py1 = boxes[-1]
            side = rng.randint(min_side, max(min_side, max_side - 2 * (count - 1)))
            overlap = rng.choice((0, 0, 1, 2))
            shift = rng.randint(-side // 3, side // 3)
            direction = rng.choice("lrud")
            if direction in "lr":
                nx = px1 - overlap if direction == "r" else px0 - side + overlap
                ny = (py0 + py1) // 2 - side // 2 + shift
            else:
                ny = py1 - overlap if direction == "d" else py0 - side + overlap
                nx = (px0 + px1) // 2 - side // 2 + shift
            box = (nx, ny, nx + side, ny + side)
            if min(box[:2]) < margin or max(box[2:]) > size - margin or _overlaps(box, boxes[:-1], 2):
                break
            boxes.append(box)
        if len(boxes) == count:
            return boxes
    return None


def training_object(rng: random.Random, colour: str | None = None) -> tuple[str, str, str]:
    """A (colour, shape, texture) with every attribute a caption can name: no held-out pair."""
    while True:
        c, s = colour or rng.choice(COLOURS), rng.choice(SHAPES)
        if (c, s) not in HELD_OUT:
            return c, s, rng.choice(TEXTURES)


def random_scene(rng: random.Random, objects: list[tuple] | None = None, background: str | None = None,
                 counts=(1, 2, 3), count_weights=(0.45, 0.4, 0.15), unnamed: dict | None = None, touching: float = 0.0) -> Scene:
    """A scene of 1-3 objects of distinct colours, none the background's, every attribute named (or
    the given ``objects``: ``(colour, shape, texture[, inner])``).  ``unnamed``: the rate of each
    unnamed attribute (see :data:`UNNAMED_RATES`); ``touching``: the chance that several objects touch."""
    if objects is None:
        count = rng.choices(counts, count_weights)[0]
        bg = background or rng.choice(BACKGROUNDS)
        objects = _draw_objects(rng, count, bg, unnamed or {})
    else:
        bg = background or rng.choice([b for b in BACKGROUNDS if b not in {o[0] for o in objects}])
    boxes = touching_boxes(rng, len(objects)) if len(objects) > 1 and rng.random() < touching else None
    boxes = boxes or place_boxes(rng, len(objects))
    if boxes is None:
        raise RuntimeError(f"could not place {len(objects)} objects")
    return Scene(bg, [Shape(o[0], o[1], o[2], box, o[3] if len(o) > 3 else None) for o, box in zip(objects, boxes)])


def _draw_objects(rng: random.Random, count: int, background: str, unnamed: dict) -> list[tuple]:
    """``count`` objects of distinct colours (and cores) other than the background's."""
    named_pool = [c for c in COLOURS if c != background]
    novel_pool = [c for c in NOVEL_COLOURS if c != background]
    objects, used = [], {background}
    for _ in range(count):
        pool = [c for c in (novel_pool if rng.random() < unnamed.get("colour", 0) else named_pool) if c not in used]
        pool = pool or [c for c in named_pool + novel_pool if c not in used]
        colour = rng.choice(pool)
        used.add(colour)
        if rng.random() < unnamed.get("shape", 0):
            shape = rng.choice(NOVEL_SHAPES)
        else:
            shape = rng.choice([s for s in SHAPES if (colour, s) not in HELD_OUT])
        texture = "dotted" if rng.random() < unnamed.get("dotted", 0) else rng.choice(TEXTURES)
        objects.append((colour, shape, texture))
    for i, (colour, shape, texture) in enumerate(objects):  # cores last, on plain objects: a colour no object of the scene has
        if texture == "plain" and rng.random() < unnamed.get("inner", 0):
            spare = [c for c in COLOURS + NOVEL_COLOURS if c not in used]
            if spare:
                inner = rng.choice(spare)
                used.add(inner)
                objects[i] = (colour, shape, texture, inner)
    return objects


def training_scene(rng: random.Random) -> Scene:
    """A scene of the UNet's training set: one to four objects, named and unnamed attributes, touching at times."""
    return random_scene(rng, counts=(1, 2, 3, 4), count_weights=(0.35, 0.35, 0.2, 0.1), unnamed=UNNAMED_RATES, touching=TOUCHING_RATE)


def any_scene(rng: random.Random, touching: float = TOUCHING_RATE) -> Scene:
    """A scene from the whole world with every unnamed attribute often (for the VAE, which reads no caption)."""
    rates = {"colour": 0.5, "shape": 0.4, "dotted": 1 / 3, "inner": 0.6}
    return random_scene(rng, counts=(1, 2, 3, 4), count_weights=(0.35, 0.35, 0.2, 0.1), unnamed=rates, touching=touching)


def training_caption(rng: random.Random, scene: Scene, drop: float = 0.1) -> str:
    """The caption a training step uses: empty with probability ``drop`` (for guidance), varied wording."""
    if rng.random() < drop:
        return ""
    return scene.caption(photo_of=rng.random() < 0.5, with_background=rng.random() < 0.8)


_CAPTION_OBJECT = re.compile(r"an? (?P<colour>\w+) (?:(?P<texture>\w+) )?(?P<shape>\w+)$")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption of this world asks for (objects without boxes), or None when ``text`` is
    not one that names every object's colour and shape:
    "[a photo of ]a red striped circle and a blue square on a green background"."""
    text = text.strip()
    if text.startswith("a photo of "):
        text = text[len("a photo of "):]
    body, sep, background = text.rpartition(" on a ")
    if not sep or not background.endswith(" background") or background[: -len(" background")] not in BACKGROUNDS + COLOURS:
        return None
    objects = []
    for part in body.split(" and "):
        m = _CAPTION_OBJECT.match(part)
        if not m or m["colour"] not in COLOURS + NOVEL_COLOURS or m["shape"] not in SHAPES:
            return None
        texture = m["texture"] or "plain"
        if texture not in TEXTURES + NOVEL_TEXTURES:
            return None
        objects.append(Shape(m["colour"], m["shape"], texture, (0, 0, 0, 0)))
    return Scene(background[: -len(" background")], objects)


def scene_info(scene: Scene) -> dict:
    """What ``scene.json`` records of a scene."""
    return {"background": scene.background, "caption": scene.caption(),
            "objects": [{"colour": o.colour, "shape": o.shape, "texture": o.texture, "box": list(o.box), **({"inner": o.inner} if o.inner else {})}
                        for o in scene.objects]}


def write_scene(directory: Path, scene: Scene, grow: int = 2) -> Path:
    """``img.png`` and loose ``mask0.png``.. (the layout ``bas run --scene`` reads), plus ``scene.json``."""
    import json

    from bas.core import io

    directory = Path(directory)
    image, masks = render(scene)
    io.save_image(directory / "img.png", image)
    for i, mask in enumerate(masks):
        io.save_image(directory / f"mask{i}.png", loose_mask(mask, grow=grow))
    (directory / "scene.json").write_text(json.dumps(scene_info(scene), indent=1))
    return directory
