"""The inputs a run learned from, kept in its folder: ``inputs/image.png`` and ``inputs/mask0.png``, ...

They are the image and masks exactly as training saw them (centre-cropped and resized to the run's
resolution, masks after cleanup, one per handle, the background handle's being the complement of
the others), so that whatever judges a run later (``bas eval``) compares against what the handles
were taught, whichever mask source made the masks and wherever the original files went.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bas.core import io
from bas.core.errors import BasError
from bas.core.scene import open_image

INPUTS_DIR = "inputs"
IMAGE_NAME = "image.png"


def mask_name(index: int) -> str:
    return f"mask{index}.png"


def save_inputs(out: Path, scene) -> list[str]:
    """Write a prepared :class:`bas.core.scene.Scene` under ``out/inputs/``; returns the relative names."""
    image = ((scene.image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    names = [f"{INPUTS_DIR}/{IMAGE_NAME}"]
    io.save_image(Path(out) / names[0], Image.fromarray(image, "RGB"))
    masks = (scene.masks.detach().float().cpu().clamp(0, 1) * 255).round().byte().numpy()
    for i, mask in enumerate(masks):
        names.append(f"{INPUTS_DIR}/{mask_name(i)}")
        io.save_image(Path(out) / names[-1], Image.fromarray(mask, "L"))
    return names


def has_inputs(out: Path) -> bool:
    return (Path(out) / INPUTS_DIR / IMAGE_NAME).is_file()


def load_inputs(out: Path, num_handles: int) -> tuple[Image.Image, list[np.ndarray]]:
    """The run's input image (RGB) and one float mask in [0, 1] per handle, as training saw them."""
    folder = Path(out) / INPUTS_DIR
    if not has_inputs(out):
        raise BasError(
            f"{out} has no {INPUTS_DIR}/ folder with the image and masks it learned from (runs made before bas kept "
            f"them lack it); run it again with `bas run ... --overwrite` to measure it."
        )
    paths = [folder / mask_name(i) for i in range(num_handles)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise BasError(f"{folder} lacks {', '.join(missing)} for the run's {num_handles} handles; the run folder is damaged, run it again.")
    damaged = "the run folder is damaged, run it again"
    image = open_image(io.inside(out, f"{INPUTS_DIR}/{IMAGE_NAME}", f"{out}/run.json"), "The run's input image", damaged).convert("RGB")
    masks = [
        np.asarray(open_image(io.inside(out, f"{INPUTS_DIR}/{p.name}", f"{out}/run.json"), "The run's mask", damaged).convert("L"), dtype=np.float32)
        / 255.0
        for p in paths
    ]
    return image, masks
