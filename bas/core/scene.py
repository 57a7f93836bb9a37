"""The input scene: one RGB image and one soft mask per concept, read, checked and resized.

Mask sources (plugins) produce a :class:`SceneInput`; :func:`prepare_scene` turns it into the
square tensors training uses, after checking what a user can get wrong.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from bas.core.errors import BasError
from bas.core.family import ImageSize
from bas.core.handles import DEFAULT_INIT_TOKEN

MAX_CONCEPTS = 8  # the paper reports degradation beyond 4; beyond 8 a run is almost surely a mistake
BACKGROUND_NAME = "background (complement of all masks)"
BACKGROUND_INIT_TOKEN = "background"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class SceneInput:
    """What a mask source returns: the image and one float mask in [0, 1] per concept (any size)."""

    image: Image.Image
    masks: list[np.ndarray]
    mask_names: list[str] = field(default_factory=list)  # where each mask came from, for messages


@dataclass
class Scene:
    """The prepared scene: ``image`` is (3, R, R) in [-1, 1]; ``masks`` is (N, R, R) in [0, 1].

    With ``background`` the last concept is the complement of all the given masks.  ``size`` is
    the image's size conditioning: its original size and where the square crop lies.
    """

    image: torch.Tensor
    masks: torch.Tensor
    mask_names: list[str]
    background: bool = False
    size: ImageSize | None = None

    @property
    def num_concepts(self) -> int:
        return self.masks.shape[0]

    def init_words(self, init_tokens: list[str] | None) -> list[str] | None:
        """One initializer word per handle: the user's (one per given mask), then 'background'."""
        if not self.background:
            return init_tokens or None
        given = list(init_tokens or []) or [DEFAULT_INIT_TOKEN] * (self.num_concepts - 1)
        return given + [BACKGROUND_INIT_TOKEN]


def load_image(path: Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise BasError(f"Image file {path} does not exist; pass an existing image with --image.")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise BasError(f"{path} is not a readable image ({exc}); pass a JPEG or PNG file with --image.") from exc


def mask_from_pil(img: Image.Image) -> np.ndarray:
    """A float mask in [0, 1] from a PIL image of any mode.

    RGBA with constant alpha (the reference scenes) keeps the mask in the grey channels; RGBA
    whose alpha varies (a cut-out) uses alpha.  Soft values are kept.
    """
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32)
        if alpha.min() != alpha.max():
            return alpha / 255.0
        img = img.convert("RGB" if img.mode == "RGBA" else "L")
    if img.mode in ("I", "I;16", "F"):
        arr = np.asarray(img, dtype=np.float32)
        return arr / arr.max() if arr.max() > 1 else arr
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def load_mask(path: Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise BasError(f"Mask file {path} does not exist; pass an existing PNG with --mask.")
    try:
        with Image.open(path) as img:
            return mask_from_pil(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise BasError(f"{path} is not a readable image ({exc}); masks must be PNG files.") from exc


def centre_square(width: int, height: int) -> tuple[int, int, int]:
    """``(left, top, side)`` of the centre square that training crops from a ``width`` x ``height`` image."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def _square(img: Image.Image, resolution: int, resample) -> Image.Image:
    """Centre-crop to a square and resize to ``resolution``."""
    left, top, side = centre_square(*img.size)
    return img.crop((left, top, left + side, top + side)).resize((resolution, resolution), resample)


def check_concept_count(scene: SceneInput, init_tokens: list[str] | None = None) -> None:
    """The checks that need no model, so a bad command fails before anything slow happens."""
    n = len(scene.masks)
    if n == 0:
        raise BasError("No masks were given; pass one --mask PNG per concept (or --scene DIR).")
    if n > MAX_CONCEPTS:
        raise BasError(f"{n} masks were given but at most {MAX_CONCEPTS} concepts are supported; split the scene into fewer concepts.")
    if init_tokens and len(init_tokens) != n:
        raise BasError(f"{len(init_tokens)} --init-token values were given for {n} masks; give one per mask or none.")


def prepare_scene(scene: SceneInput, resolution: int, init_tokens: list[str] | None = None, background: bool = False) -> Scene:
    """Check the masks against the image and each other, then crop and resize everything.

    ``background`` adds one more concept whose mask is everything no given mask covers (the
    paper's background extraction).
    """
    check_concept_count(scene, init_tokens)
    names = scene.mask_names or [f"mask {i}" for i in range(len(scene.masks))]
    w, h = scene.image.size
    masks = []
    for name, mask in zip(names, scene.masks):
        mask = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
        if mask.ndim != 2:
            raise BasError(f"{name} is not a single-channel mask; save it as a greyscale PNG.")
        mh, mw = mask.shape
        if abs(mw / mh - w / h) > 0.01:
            warnings.warn(f"{name} is {mw}x{mh} but the image is {w}x{h}; the mask is stretched to the image's size.", stacklevel=2)
        pil = Image.fromarray((mask * 255).round().astype(np.uint8), mode="L")
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.BILINEAR)
        pil = _square(pil, resolution, Image.BILINEAR)
        arr = np.asarray(pil, dtype=np.float32) / 255.0
        coverage = float((arr > 0.5).mean())
        if coverage == 0.0:
            raise BasError(f"{name} is empty after cropping to a square (no pixel above 0.5); draw the concept in white on black.")
        if coverage == 1.0:
            raise BasError(f"{name} covers the whole image; a mask must mark one concept, white on a black background.")
        masks.append(torch.from_numpy(arr))
    names = list(names)
    if background:
        complement = 1.0 - torch.stack(masks).amax(dim=0)
        if not (complement > 0.5).any():
            raise BasError("The masks cover the whole image, so --background has nothing to extract; leave out --background.")
        masks.append(complement)
        names.append(BACKGROUND_NAME)
    image = _square(scene.image, resolution, Image.BICUBIC)
    image_t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return Scene(image=image_t, masks=torch.stack(masks), mask_names=names, background=background,
                 size=crop_size(w, h, resolution))


def crop_size(width: int, height: int, resolution: int) -> ImageSize:
    """The size conditioning of an image centre-cropped to a square and resized to ``resolution``:
    the crop's corner is given in the image resized so its short side is ``resolution``, as
    diffusers' SDXL training scripts give it."""
    left, top, side = centre_square(width, height)
    scale = resolution / side
    return ImageSize((height, width), (round(top * scale), round(left * scale)), (resolution, resolution))


def find_scene_files(directory: Path) -> tuple[Path, list[Path]]:
    """The reference code's layout: ``img.*`` and ``mask0.png``, ``mask1.png``, ... in one folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BasError(f"Scene folder {directory} does not exist; --scene needs a folder holding img.jpg and mask0.png, mask1.png, ...")
    images = [p for p in sorted(directory.glob("img.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise BasError(f"Scene folder {directory} has no img.jpg or img.png; put the input image there under that name.")
    masks = []
    while (directory / f"mask{len(masks)}.png").is_file():
        masks.append(directory / f"mask{len(masks)}.png")
    if not masks:
        raise BasError(f"Scene folder {directory} has no mask0.png; add one mask per concept named mask0.png, mask1.png, ...")
    return images[0], masks
