"""``bas demo``: the whole product offline, on a scene it draws and bas-mini (or a tiny random model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bas.core import io
from bas.core.errors import BasError


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


# (label, prompt) for the contact sheet: each concept alone, recomposed, and in a new context
DEMO_PROMPTS = (
    ("<asset0>", "a photo of <asset0>"),
    ("<asset1>", "a photo of <asset1>"),
    ("<asset1>+<asset0>", "a photo of <asset1> and <asset0>"),
    ("<asset0> on yellow", "a photo of <asset0> on a yellow background"),
)


DEMO_ENTRIES = {"scene": {"img.png", "mask0.png", "mask1.png", "scene.json"}, "run": None, "demo.png": None}


def check_demo_out(out: Path) -> None:
    """``bas demo --out``: what the demo writes there (``scene/``, ``run/``, ``demo.png``) may be replaced,
    as an earlier demo wrote it; a folder holding anything else is refused before anything is written
    (the run folder itself is guarded as ``bas run --out``: only a bas run is ever replaced)."""
    from bas.core.runfolder import check_target, own_name

    check_target(out, kind="demo")
    out = Path(out)
    if not out.is_dir():
        return
    foreign = []
    for entry in sorted(out.iterdir()):
        if own_name(entry) is not None or entry.name == "run":
            continue
        if entry.name not in DEMO_ENTRIES or entry.is_symlink() or (entry.is_dir() != (DEMO_ENTRIES[entry.name] is not None)):
            foreign.append(entry.name)
        elif entry.is_dir():
            foreign += [f"{entry.name}/{p.name}" for p in sorted(entry.iterdir()) if p.name not in DEMO_ENTRIES[entry.name]]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise BasError(f"--out {out} holds {foreign[0]}{more}, which the demo does not write; choose a new or empty folder (or an earlier demo's).")


def draw_mini_scene(directory: Path) -> Path:
    """A bas-mini world scene bas-mini cannot name: a purple dotted circle and an orange square on grey."""
    import random

    from bas.mini import world

    background, objects = world.NOVEL_SCENES["purple-orange"]
    scene = world.random_scene(random.Random(3), objects=objects, background=background)
    return world.write_scene(directory, scene)


def contact_sheet(path: Path, tiles: list[tuple[str, Image.Image]], size: int = 128, columns: int = 6) -> None:
    """One PNG with labelled tiles, ``columns`` to a row."""
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (size * min(columns, len(tiles)), (size + 16) * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, tile) in enumerate(tiles):
        x, y = (i % columns) * size, (i // columns) * (size + 16)
        sheet.paste(tile.convert("RGB").resize((size, size), Image.NEAREST), (x, y + 16))
        draw.text((x + 3, y + 2), label[:22], fill="black")
    io.save_image(path, sheet)
