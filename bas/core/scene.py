"""The input scene: one RGB image and one soft mask per concept, read, checked and resized.

Mask sources (plugins) produce a :class:`SceneInput`; :func:`prepare_scene` turns it into the
square tensors training uses, after checking what a user can get wrong.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from bas.core.errors import BasError
from bas.core.io import inside
from bas.core.family import ImageSize
from bas.core.handles import DEFAULT_INIT_TOKEN

MAX_CONCEPTS = 8  # the paper reports degradation beyond 4; beyond 8 a run is almost surely a mistake
MIN_IMAGE_SIDE = 8  # below one latent cell (SD, SDXL and FLUX VAEs downsample 8x) an image holds no concept to learn
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


def open_image(path: Path, what: str, fix: str) -> Image.Image:
    """Open and decode an image, turned as viewers show it (EXIF orientation), within PIL's size limit.

    ``what`` names the file in messages (``Image file``, ``Mask file``); ``fix`` says what to pass.
    """
    path = Path(path)
    if path.is_dir():
        raise BasError(f"{what} {path} is a folder, not a file; {fix}.")
    if not path.is_file():
        raise BasError(f"{what} {path} does not exist; {fix}.")
    try:
        with warnings.catch_warnings():
            # PIL warns from MAX_IMAGE_PIXELS and refuses from twice that: a huge image is an error here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                frames = getattr(img, "n_frames", 1)
                img.load()
                img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BasError(f"{path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, PIL's limit against decompression bombs; "
                       "scale it down below that (bas resizes it to --resolution anyway).") from None
    except Exception as exc:  # PIL reports damaged files with many exception types
        raise BasError(f"{path} is not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {fix}.") from exc
    if frames > 1:
        warnings.warn(f"{path} has {frames} frames (an animation or several pages); only the first is used.", stacklevel=2)
    return img


def _sixteen_bit(img: Image.Image, path: Path) -> np.ndarray:
    """The values of a 16- or 32-bit single-channel image, refusing ranges with no standard brightness."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        if arr.min() >= 0 and arr.max() <= 1:
            return arr * 65535
        raise BasError(f"{path} is a floating-point image with values outside 0-1, which have no standard brightness; save it as an 8-bit PNG or JPEG.")
    if arr.min() < 0 or arr.max() > 65535:
        raise BasError(f"{path} holds 32-bit values outside 0-65535, which have no standard brightness; save it as an 8- or 16-bit PNG.")
    return arr


def _to_srgb(colour: Image.Image, icc: bytes | None, path: Path) -> Image.Image:
    """An RGB image of ``colour`` (mode RGB, L, CMYK, LAB, ...), through its colour profile when it has one."""
    from PIL import ImageCms

    if colour.mode == "LAB" and not icc:
        lab = ImageCms.createProfile("LAB")
        return ImageCms.profileToProfile(colour, lab, ImageCms.createProfile("sRGB"), outputMode="RGB")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(BytesIO(icc))
            if "srgb" not in ImageCms.getProfileDescription(profile).lower():
                return ImageCms.profileToProfile(colour, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            warnings.warn(f"{path}'s colour profile cannot be applied ({exc}); its colours may differ from a viewer's.", stacklevel=3)
    return colour.convert("RGB")


def to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """The RGB image a viewer shows for ``img``, whatever its mode.

    16-bit and [0, 1] float images are scaled to 8 bits (PIL's own conversion clips them, white);
    a colour profile (CMYK, Adobe RGB, Display P3, ...) is converted to sRGB; transparent pixels
    are composited over white, as browsers and most viewers show them (PIL's conversion would
    show the colour hidden under them).
    """
    path = Path(path)
    icc = img.info.get("icc_profile")
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray((_sixteen_bit(img, path) / 257).round().astype(np.uint8), mode="L")
        icc = None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("PA", "RGBa"):
        img = img.convert("RGBA")
    elif img.mode == "La":
        img = img.convert("LA")
    alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else None
    colour = img.convert("RGB" if img.mode == "RGBA" else "L") if alpha is not None else img
    rgb = _to_srgb(colour, icc, path)
    if alpha is not None and alpha.getextrema() != (255, 255):
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, (255, 255, 255)), alpha)
    return rgb


def load_image(path: Path) -> Image.Image:
    img = open_image(path, "Image file", "pass a JPEG or PNG file with --image")
    return to_rgb(img, path)


def check_image_size(image: Image.Image, name: str = "The image") -> None:
    """Refuse an image too small to learn or edit a concept in, before any mask is resized to it
    (and blamed for what it lost)."""
    if min(image.size) < MIN_IMAGE_SIDE:
        raise BasError(f"{name} is {image.size[0]}x{image.size[1]} pixels, too small to hold a concept: an image needs at least "
                       f"{MIN_IMAGE_SIDE} pixels a side (one cell of the model's latent grid); pass the full-size picture.")


def mask_at_image_size(name: str, mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A float mask as an 8-bit image of the image's ``(width, height)``: resized (bilinear), with a
    warning where its aspect differs, because then it is stretched, not only scaled."""
    mh, mw = mask.shape
    w, h = size
    if abs(mw / mh - w / h) > 0.01:
        warnings.warn(f"{name} is {mw}x{mh} but the image is {w}x{h}; the mask is stretched to the image's size.", stacklevel=3)
    pil = Image.fromarray((np.clip(mask, 0.0, 1.0) * 255).round().astype(np.uint8), mode="L")
    return pil if pil.size == (w, h) else pil.resize((w, h), Image.BILINEAR)


def mask_from_pil(img: Image.Image) -> np.ndarray:
    """A float mask in [0, 1] from a PIL image of any mode.

    RGBA with constant alpha (the reference scenes) keeps the mask in the grey channels; RGBA
    whose alpha varies (a cut-out) uses alpha.  Soft values are kept.  16-bit masks are read at
    16 bits (0-65535), float masks as 0-1 (or 0-255); 0/1 masks of any depth are binary masks.
    """
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32)
        if alpha.min() != alpha.max():
            return alpha / 255.0
        img = img.convert("RGB" if img.mode in ("RGBA", "PA", "RGBa") else "L")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if not np.isfinite(arr).all() or arr.min() < 0:
            raise BasError("the mask holds negative or non-finite values; save it as an 8-bit greyscale PNG.")
        if arr.max() <= 1:
            return arr.astype(np.float32)
        if img.mode == "F" and arr.max() <= 255:
            return (arr / 255.0).astype(np.float32)
        if arr.max() > 65535:
            raise BasError("the mask holds values above 65535; save it as an 8-bit greyscale PNG.")
        return (arr / 65535.0).astype(np.float32)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def load_mask(path: Path) -> np.ndarray:
    img = open_image(path, "Mask file", "pass an existing PNG with --mask")
    try:
        return mask_from_pil(img)
    except BasError as exc:
        raise BasError(f"{path}: {exc}") from None


def scene_fingerprint(scene: SceneInput) -> str:
    """A hash of the image and masks as loaded (not of their files): what training sees.

    Masks are hashed at 8 bits, so a mask source's float noise below that does not count.
    """
    digest = hashlib.sha256()
    image = scene.image.convert("RGB")
    digest.update(repr(image.size).encode())
    digest.update(image.tobytes())
    for mask in scene.masks:
        arr = (np.clip(np.asarray(mask, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
        digest.update(repr(arr.shape).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


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
    check_image_size(scene.image)
    names = scene.mask_names or [f"mask {i}" for i in range(len(scene.masks))]
    w, h = scene.image.size
    masks = []
    for name, mask in zip(names, scene.masks):
        mask = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
        if mask.ndim != 2:
            raise BasError(f"{name} is not a single-channel mask; save it as a greyscale PNG.")
        pil = _square(mask_at_image_size(name, mask, (w, h)), resolution, Image.BILINEAR)
        arr = np.asarray(pil, dtype=np.float32) / 255.0
        coverage = float((arr > 0.5).mean())
        if coverage == 0.0:
            raise BasError(f"{name} is empty after cropping to a square (no pixel above 0.5); draw the concept in white on black.")
        if coverage == 1.0:
            raise BasError(f"{name} covers the whole image; a mask must mark one concept, white on a black background.")
        masks.append(arr)
    names = list(names)
    # the checks read the arrays, before any tensor exists: a memory plan (bas.memory) makes its tensors fake (values unknown)
    if background:
        complement = 1.0 - np.stack(masks).max(axis=0)
        if not (complement > 0.5).any():
            raise BasError("The masks cover the whole image, so --background has nothing to extract; leave out --background.")
        masks.append(complement)
        names.append(BACKGROUND_NAME)
    masks = [torch.from_numpy(m) for m in masks]
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


MASK_FILE = re.compile(r"mask(\d+)\.([A-Za-z0-9]+)", re.IGNORECASE)


def find_scene_files(directory: Path) -> tuple[Path, list[Path]]:
    """The reference code's layout: ``img.*`` and ``mask0.png``, ``mask1.png``, ... in one folder.

    Mask numbers must run from 0 without a gap: a missing number, a mask that is not PNG or a
    number written two ways (``mask1.png``, ``mask01.png``) is an error, never a mask left out.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BasError(f"Scene folder {directory} does not exist; --scene needs a folder holding img.jpg and mask0.png, mask1.png, ...")
    images = [p for p in sorted(directory.glob("img.*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not images:
        raise BasError(f"Scene folder {directory} has no img.jpg or img.png; put the input image there under that name.")
    if len(images) > 1:
        raise BasError(f"Scene folder {directory} has {len(images)} input images ({', '.join(p.name for p in images)}); keep one img.* file.")
    found: dict[int, Path] = {}
    for path in sorted(directory.iterdir()):
        m = MASK_FILE.fullmatch(path.name)
        if not m:
            continue
        number, suffix = m.groups()
        if suffix.lower() != "png" or not path.is_file():
            raise BasError(f"Scene folder {directory} has {path.name}; masks must be PNG files named mask0.png, mask1.png, ...")
        if str(int(number)) != number or int(number) in found:
            raise BasError(f"Scene folder {directory} has {path.name}; name masks mask0.png, mask1.png, ... without leading zeros, once each.")
        found[int(number)] = path
    if not found:
        raise BasError(f"Scene folder {directory} has no mask0.png; add one mask per concept named mask0.png, mask1.png, ...")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise BasError(f"Scene folder {directory} has {found[max(found)].name} but no mask{missing[0]}.png; number the masks from 0 without gaps "
                       "(each number is a handle, <asset0>, <asset1>, ...).")
    # a file of the scene is a file in its folder, never one a link leads to elsewhere
    return inside(directory, images[0].name, f"Scene folder {directory}"), [inside(directory, found[i].name, f"Scene folder {directory}") for i in range(len(found))]
