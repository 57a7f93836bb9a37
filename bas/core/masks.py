"""Masks from the chosen mask source, cleaned and checked; ``bas masks`` writes them with a preview.

Both ``bas run`` and ``bas masks`` get their masks through :func:`load_scene_input`: the mask
source (a plugin) loads the image and masks, then the shared cleanup
(:mod:`bas.core.mask_cleanup`) applies to whatever it returned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from bas.core import io
from bas.core.errors import BasError
from bas.core.handles import handle_tokens
from bas.core.mask_cleanup import MaskCleanup
from bas.core.plugins import Plugins
from bas.core.scene import SceneInput, centre_square, prepare_scene

# Colours of the preview's masks, in handle order (matplotlib's tab10, which stays distinct on photos).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PREVIEW_MAX_SIDE = 1024
CHECK_RESOLUTION = 512  # masks are checked as training at SD 2.1's resolution would see them


@dataclass
class MasksConfig:
    """Options of ``bas masks``.  Mask sources read ``image``, ``device`` and ``options`` as they do
    from a run's config; ``mask_model`` is ``bas masks --model``, the checkpoint of a model-based
    source (SAM's), where ``bas run`` has a source-specific option because its ``--model`` is the
    diffusion model."""

    out: Path
    image: Path | None = None
    device: str = "auto"
    mask_model: str | None = None
    overwrite: bool = False
    plugins: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


def make_masks_config(plugins: Plugins, values: dict[str, Any], plugin_names) -> MasksConfig:
    """A :class:`MasksConfig` from ``bas masks`` option values; absent plugin options take their defaults."""
    from bas.core.plugins import option_default

    options = {opt.name: option_default(opt) for _, opt in plugins.mask_options()}
    options.update({k: v for k, v in values.items() if k in options})
    core = {k: v for k, v in values.items() if k not in options}
    return MasksConfig(plugins=list(plugin_names), options=options, **core)


def check_source_options(plugins: Plugins, config) -> None:
    """Refuse options of a mask source that this run does not use (``--mask`` with sam-masks, ...)."""
    from bas.core.plugins import option_default

    chosen = plugins.choose("mask source")
    other_sources = {e.plugin: e.name for e in plugins.registry("mask source").entries.values() if e.plugin != chosen.plugin}
    for plugin, opt in plugins.run_options():
        if plugin in other_sources and opt.name in config.options and config.options[opt.name] != option_default(opt):
            raise BasError(
                f"{opt.opts[0]} belongs to the '{other_sources[plugin]}' mask source, but the masks come from "
                f"'{chosen.name}' (plugin '{chosen.plugin}'); drop {opt.opts[0]} or do not name --plugin {chosen.plugin}."
            )


def load_scene_input(plugins: Plugins, source, config) -> SceneInput:
    """The image and masks from ``source`` (the chosen mask source's object), with cleanup applied."""
    cleanup = MaskCleanup.from_options(config.options)  # option errors before a slow source loads
    check_source_options(plugins, config)
    scene = source.load(config)
    names = scene.mask_names or [f"mask {i}" for i in range(len(scene.masks))]
    if not cleanup.active:
        return SceneInput(scene.image, scene.masks, names)
    width, height = scene.image.size
    cleaned = []
    for name, mask in zip(names, scene.masks):
        mask = np.asarray(mask, dtype=np.float32)
        scale = float(np.sqrt(mask.shape[1] / width * mask.shape[0] / height)) if mask.ndim == 2 else 1.0
        after = cleanup.apply(mask, scale) if mask.ndim == 2 else mask
        if (mask > 0.5).any() and not (after > 0.5).any():
            raise BasError(f"{name} is empty after mask cleanup ({cleanup.describe()}); use a smaller --mask-erode or a lower --mask-threshold.")
        cleaned.append(after)
    return SceneInput(scene.image, cleaned, names)


SCENE_FILE = re.compile(r"img\.[A-Za-z0-9]+|mask\d+\.png|preview\.png|scene\.json")  # what a scene folder holds (scene.json: bas ui's)


def input_paths(config: MasksConfig, plugins: Plugins) -> list[tuple[str, Path]]:
    """Every file or folder the options name: the image, a local ``--model``, and the values of the
    mask sources' and cleanup's options of click's ``Path`` type (``--mask``, ``--scene``, ``--annotations``)."""
    from bas.core.runfolder import option_paths

    return option_paths(config.image, config.mask_model, config.options, (opt for _, opt in plugins.mask_options()))


def check_out(config: MasksConfig, plugins: Plugins) -> Path:
    """Refuse, before any work, an ``--out`` that ``bas masks`` may not replace as a whole: what
    ``bas run --out`` refuses (the root, home or current folder or one above it, a folder holding
    any input, bas's own names; :func:`bas.core.runfolder.check_target`), a link, a folder holding
    masks already unless ``--overwrite``, and one holding anything a scene folder does not."""
    from bas.core.runfolder import check_target

    out = Path(config.out)
    check_target(out, input_paths(config, plugins), kind="scene")
    if out.is_symlink():
        raise BasError(f"--out {out} is a link; bas masks replaces --out as a whole, so pass the folder it points to or a new one.")
    if not out.is_dir():
        return out
    names = sorted(p.name for p in out.iterdir())
    if not config.overwrite and any(name.startswith("mask") and name.endswith(".png") for name in names):
        raise BasError(f"{out} already holds masks; pass --overwrite to replace them or choose another --out.")
    foreign = [name for name in names if not SCENE_FILE.fullmatch(name)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise BasError(f"--out {out} holds {foreign[0]}{more}, which no scene holds, and bas masks replaces the whole folder; "
                       "choose a new or empty folder.")
    return out


def make_masks(config: MasksConfig, plugins: Plugins) -> list[Path]:
    """What ``bas masks`` does: load, clean and check the masks, then write ``mask0.png``, ...,
    ``img.png`` and ``preview.png`` as the folder ``config.out``.  Nothing is written when a check
    fails, and the folder appears (or replaces the previous scene there) only once every file is
    complete (:func:`bas.core.io.atomic_path`): a failure half-way leaves ``--out`` as it was."""
    out = check_out(config, plugins)
    source = plugins.choose("mask source").factory(config)
    scene = load_scene_input(plugins, source, config)
    prepare_scene(scene, CHECK_RESOLUTION)  # the checks `bas run` makes (count, empty after the crop, ...)
    size = scene.image.size
    masks = [to_image_size(m, size) for m in scene.masks]
    preview = render_preview(scene.image, masks, handle_tokens(len(masks)))
    names = [f"mask{i}.png" for i in range(len(masks))] + ["img.png", "preview.png"]
    with io.atomic_path(out, directory=True) as tmp:
        for name, mask in zip(names, masks):
            io.save_image(tmp / name, Image.fromarray((mask * 255).round().astype(np.uint8)))
        io.save_image(tmp / "img.png", scene.image)
        io.save_image(tmp / "preview.png", preview)
        check_out(config, plugins)  # again: nothing may have appeared at --out while the masks were made
    return [Path(config.out) / name for name in names]


def to_image_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float mask resized (bilinear) to the image's ``(width, height)``."""
    mask = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
    if mask.shape[::-1] == tuple(size):
        return mask
    pil = Image.fromarray(mask).resize(size, Image.BILINEAR)
    return np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0)


def render_preview(image: Image.Image, masks: list[np.ndarray], labels: list[str]) -> Image.Image:
    """The image with each mask tinted in its own colour, outlined and labelled (with its handle).

    Outside the square centre crop that training keeps, the image is dimmed.  Masks are at the
    image's size; the preview is scaled down to at most ``PREVIEW_MAX_SIDE`` pixels.
    """
    width, height = image.size
    factor = min(1.0, PREVIEW_MAX_SIDE / max(width, height))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    canvas = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32)
    small = [to_image_size(m, size) for m in masks]
    left, top, side = (round(v * factor) for v in centre_square(width, height))
    outside = np.ones(canvas.shape[:2], dtype=bool)
    outside[top : top + side, left : left + side] = False
    canvas[outside] *= 0.45
    for k, mask in enumerate(small):
        colour = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
        alpha = 0.5 * mask[..., None]
        canvas = canvas * (1 - alpha) + colour * alpha
        core = mask > 0.5
        edge = core & ~ndimage.binary_erosion(core, iterations=max(1, round(min(size) / 256)))
        canvas[edge] = colour
    preview = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(preview)
    font = ImageFont.load_default(size=max(10, round(min(size) / 24)))
    placed: list[tuple[int, int, int, int]] = []
    for k, (mask, label) in enumerate(zip(small, labels)):
        core = mask > 0.5
        if not label or not core.any():
            continue
        # the label sits at the point deepest inside the mask (of those, the nearest to its centre),
        # so it lands on the object even when the object is not convex
        depth = ndimage.distance_transform_edt(np.pad(core, 1))[1:-1, 1:-1]
        deepest = np.argwhere(depth == depth.max())
        y, x = deepest[np.argmin(((deepest - np.argwhere(core).mean(axis=0)) ** 2).sum(axis=1))]
        x0, y0, x1, y1 = draw.textbbox((x, y), label, font=font, anchor="mm")
        x0, y0, x1, y1 = x0 - 3, y0 - 2, x1 + 3, y1 + 2  # padding of the label's box
        dx = max(0, -x0) - max(0, x1 - size[0] + 1)  # keep the box on the canvas
        dy = max(0, -y0) - max(0, y1 - size[1] + 1)
        for _ in range(len(placed)):  # below a label it would cover (masks of adjacent objects)
            hit = next((b for b in placed if x0 + dx < b[2] and b[0] < x1 + dx and y0 + dy < b[3] and b[1] < y1 + dy), None)
            if hit is None:
                break
            dy = hit[3] + 1 - y0
        box = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
        placed.append(box)
        draw.rectangle(box, fill=PALETTE[k % len(PALETTE)], outline=(255, 255, 255))
        draw.text((x + dx, y + dy), label, font=font, anchor="mm", fill=(255, 255, 255))
    return preview
