"""The bas-mini world: flat shapes on flat backgrounds, each scene with a caption and per-object masks.

Every attribute is drawn from a small known vocabulary, so a generated image can be read back
from its pixels (:mod:`bas.mini.metrics`).  The training captions use only part of it:
:data:`NOVEL_COLOURS` and the ``dotted`` texture never appear in training, which gives the
fidelity benchmark concepts the base model cannot name, and :data:`HELD_OUT` colour-shape pairs
are left out of training to measure how the base model composes words it knows.
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
    # never in a training caption: concepts the base model cannot name
    "orange": (245, 135, 20),
    "purple": (140, 50, 200),
    "pink": (245, 130, 200),
    "cyan": (40, 210, 220),
}
COLOURS = ("red", "green", "blue", "yellow")  # object colours of the training captions
BACKGROUNDS = ("grey", "black", "green", "blue", "yellow")
NOVEL_COLOURS = ("orange", "purple", "pink", "cyan")
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("plain", "striped")  # plain is not named in captions
NOVEL_TEXTURES = ("dotted",)
TEXTURE_COLOUR = PALETTE["white"]  # stripes and dots
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))  # never trained, for base quality
# scenes of objects (colour, shape, texture) no caption names, with their background: for `bas demo`
# (purple-orange) and the fidelity benchmark (both)
NOVEL_SCENES = {
    "purple-orange": ("grey", [("purple", "circle", "dotted"), ("orange", "square", "plain")]),
    "pink-cyan-orange": ("black", [("pink", "triangle", "plain"), ("cyan", "square", "striped"), ("orange", "circle", "dotted")]),
}

# every word a caption or a benchmark prompt uses, one token each in the bas-mini tokenizer
VOCABULARY = tuple(dict.fromkeys(
    "a photo of and on background object thing".split() + list(PALETTE) + list(SHAPES) + ["striped", "dotted"]
))

SIZE = 64  # pixels
SUPERSAMPLE = 4  # drawn at 4x and reduced, for anti-aliased edges


@dataclass(frozen=True)
class Shape:
    """One object: what it is and where (box in pixels of the final image: x0, y0, x1, y1)."""

    colour: str
    shape: str
    texture: str
    box: tuple[float, float, float, float]

    def words(self) -> str:
        texture = "" if self.texture == "plain" else f"{self.texture} "
        return f"{self.colour} {texture}{self.shape}"


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
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


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
    period = 8 * k  # wide enough to survive the VAE's 8x reduction
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
    """The scene's RGB image and one exact mask per object (float, in [0, 1], ``size`` x ``size``)."""
    k = SUPERSAMPLE
    image = Image.new("RGB", (size * k, size * k), PALETTE[scene.background])
    masks = []
    for obj in scene.objects:
        outline = Image.new("L", image.size, 0)
        _outline(ImageDraw.Draw(outline), obj.shape, [v * k for v in obj.box], 255)
        image.paste(PALETTE[obj.colour], mask=outline)
        pattern = _texture_mask(obj.texture, obj.box, size)
        if pattern is not None:
            inside = Image.fromarray(np.minimum(np.asarray(pattern), np.asarray(outline)))
            image.paste(TEXTURE_COLOUR, mask=inside)
        masks.append(np.asarray(outline.resize((size, size), Image.BOX), dtype=np.float32) / 255.0)
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
                side = rng.randint(min_side, max_side - 3 * (count - 1))
                x, y = rng.randint(margin, size - margin - side), rng.randint(margin, size - margin - side)
                box = (x, y, x + side, y + side)
                if not _overlaps(box, boxes, gap):
                    boxes.append(box)
                    break
        if len(boxes) == count:
            return boxes
    return None


def training_object(rng: random.Random, colour: str | None = None) -> tuple[str, str, str]:
    """A (colour, shape, texture) a training caption may name: no novel word, no held-out pair."""
    while True:
        c, s = colour or rng.choice(COLOURS), rng.choice(SHAPES)
        if (c, s) not in HELD_OUT:
            return c, s, rng.choice(TEXTURES)


def random_scene(rng: random.Random, objects: list[tuple[str, str, str]] | None = None, background: str | None = None,
                 counts=(1, 2, 3), count_weights=(0.45, 0.4, 0.15)) -> Scene:
    """A training scene (or one with the given ``objects``): 1-3 objects of distinct colours, none the background's."""
    if objects is None:
        count = rng.choices(counts, count_weights)[0]
        bg = background or rng.choice(BACKGROUNDS)
        colours = rng.sample([c for c in COLOURS if c != bg], count)
        objects = [training_object(rng, c) for c in colours]
    else:
        bg = background or rng.choice([b for b in BACKGROUNDS if b not in {o[0] for o in objects}])
    boxes = place_boxes(rng, len(objects))
    if boxes is None:
        raise RuntimeError(f"could not place {len(objects)} objects")
    return Scene(bg, [Shape(c, s, t, box) for (c, s, t), box in zip(objects, boxes)])


def any_scene(rng: random.Random) -> Scene:
    """A scene from the whole world, novel colours and textures included (for the VAE, which reads no caption)."""
    count = rng.choices((1, 2, 3), (0.45, 0.4, 0.15))[0]
    bg = rng.choice(BACKGROUNDS)
    colours = rng.sample([c for c in COLOURS + NOVEL_COLOURS if c != bg], count)
    return random_scene(rng, objects=[(c, rng.choice(SHAPES), rng.choice(TEXTURES + NOVEL_TEXTURES)) for c in colours], background=bg)


def training_caption(rng: random.Random, scene: Scene, drop: float = 0.1) -> str:
    """The caption a training step uses: empty with probability ``drop`` (for guidance), varied wording."""
    if rng.random() < drop:
        return ""
    return scene.caption(photo_of=rng.random() < 0.5, with_background=rng.random() < 0.8)


_CAPTION_OBJECT = re.compile(r"an? (?P<colour>\w+) (?:(?P<texture>\w+) )?(?P<shape>\w+)$")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption of this world asks for (objects without boxes), or None when ``text`` is
    not one: "[a photo of ]a red striped circle and a blue square on a green background"."""
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


def write_scene(directory: Path, scene: Scene, grow: int = 2) -> Path:
    """``img.png`` and loose ``mask0.png``.. (the layout ``bas run --scene`` reads), plus ``scene.json``."""
    import json

    from bas.core import io

    directory = Path(directory)
    image, masks = render(scene)
    io.save_image(directory / "img.png", image)
    for i, mask in enumerate(masks):
        io.save_image(directory / f"mask{i}.png", loose_mask(mask, grow=grow))
    info = {"background": scene.background, "objects": [{"colour": o.colour, "shape": o.shape, "texture": o.texture, "box": list(o.box)} for o in scene.objects],
            "caption": scene.caption()}
    (directory / "scene.json").write_text(json.dumps(info, indent=1))
    return directory
