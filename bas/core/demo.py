"""``bas demo``: the whole product offline on a scene it draws and a tiny model it builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bas.core import io


def draw_scene(directory: Path, size: int = 128) -> Path:
    """A red disc and a blue square on a green-to-yellow background, with loose soft masks."""
    directory = Path(directory)
    y = np.linspace(0, 1, size)[:, None, None]
    background = (np.array([70, 150, 80]) * (1 - y) + np.array([220, 210, 120]) * y) * np.ones((1, size, 1))
    image = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    s = size / 128
    disc = (14 * s, 40 * s, 58 * s, 84 * s)
    square = (72 * s, 36 * s, 114 * s, 78 * s)
    draw.ellipse(disc, fill=(210, 40, 40))
    draw.rectangle(square, fill=(40, 60, 200))
    for i in range(5):  # stripes on the square, a texture for the handle to learn
        x = square[0] + (i * 2 + 1) * (square[2] - square[0]) / 10
        draw.line((x, square[1], x, square[3]), fill=(230, 230, 240), width=max(1, int(2 * s)))
    io.save_image(directory / "img.png", image)
    for i, (shape, box) in enumerate((("ellipse", disc), ("rectangle", square))):
        mask = Image.new("L", (size, size), 0)
        grown = (box[0] - 3 * s, box[1] - 3 * s, box[2] + 3 * s, box[3] + 3 * s)  # loose, as a hand-made mask
        getattr(ImageDraw.Draw(mask), shape)(grown, fill=255)
        io.save_image(directory / f"mask{i}.png", mask.filter(ImageFilter.GaussianBlur(1.5 * s)))
    return directory


def contact_sheet(path: Path, tiles: list[tuple[str, Image.Image]], size: int = 128) -> None:
    """One PNG with labelled tiles side by side."""
    sheet = Image.new("RGB", (size * len(tiles), size + 16), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, tile) in enumerate(tiles):
        sheet.paste(tile.convert("RGB").resize((size, size)), (i * size, 16))
        draw.text((i * size + 3, 2), label[:22], fill="black")
    io.save_image(path, sheet)
