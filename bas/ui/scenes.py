"""The Scene tab's model: an image and its concepts, each from SAM prompts or an uploaded mask PNG.

Nothing here segments or writes masks by itself: SAM masks come from the ``sam-masks`` plugin's
:class:`~bas.plugins.sam_masks.Sam` with prompts written in its ``--point``/``--box`` syntax (so
each concept's prompt is a command-line argument too), the preview is :func:`bas.core.masks.render_preview`
(what ``preview.png`` shows), cleanup is :class:`~bas.core.mask_cleanup.MaskCleanup`, and "save
scene" is :func:`bas.core.masks.make_masks` with the ``files`` source: ``bas masks``'s checks and
files.
"""

from __future__ import annotations

import base64
import io as stdio
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bas.core import io
from bas.core.errors import BasError
from bas.core.handles import DEFAULT_INIT_TOKEN, handle_tokens
from bas.core.mask_cleanup import MaskCleanup
from bas.core.masks import PALETTE, make_masks, make_masks_config, render_preview, to_image_size
from bas.core.scene import MAX_CONCEPTS, find_scene_files, load_image, load_mask
from bas.ui.workspace import Workspace

DISPLAY_MAX_SIDE = 768  # the page's picture; clicks come back as fractions of it
WORKING_SIDE = 1024  # an upload's longest side is brought down to this: the largest any family trains at (SDXL, FLUX), SAM's input size


@dataclass
class Concept:
    """One concept: SAM prompts in the order they were given, or an uploaded mask."""

    prompts: list[tuple] = field(default_factory=list)  # ("point", x, y, label) or ("box", x0, y0, x1, y1)
    mask_file: str | None = None  # where an uploaded mask came from (for messages)
    init_word: str = ""
    mask: np.ndarray | None = None  # at the image's size, before cleanup

    @property
    def points(self) -> list[tuple[float, float, int]]:
        return [p[1:] for p in self.prompts if p[0] == "point"]

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        boxes = [p[1:] for p in self.prompts if p[0] == "box"]
        return boxes[-1] if boxes else None

    def sam_prompt(self) -> tuple[str, str] | None:
        """The concept's prompt as ``bas masks --plugin sam-masks`` takes it: ``("--point", "X,Y+no:X,Y")``
        or ``("--box", "X0,Y0,X1,Y1+X,Y")``."""
        if self.mask_file or not self.prompts:
            return None
        points = [f"{'' if label else 'no:'}{x:.0f},{y:.0f}" for x, y, label in self.points]
        if self.box:
            return "--box", "+".join([",".join(f"{v:.0f}" for v in self.box), *points])
        return "--point", "+".join(points)


@dataclass
class Draft:
    """The scene being made on the page."""

    image: Path
    size: tuple[int, int]
    concepts: list[Concept] = field(default_factory=list)
    selected: int = 0
    origin: str = ""  # the scene folder it was opened from, if any

    @property
    def current(self) -> Concept:
        if not self.concepts:
            self.concepts.append(Concept())
            self.selected = 0
        return self.concepts[self.selected]

    def labels(self) -> list[str]:
        return handle_tokens(len(self.concepts))


def new_draft(image: Path) -> Draft:
    picture = load_image(image)  # an unreadable upload is an error here, not later
    return Draft(image=Path(image), size=picture.size)


def working_copy(upload: Path, keep_original: bool = False) -> tuple[Path, tuple[int, int]]:
    """An uploaded image at the working size: a photo of 48 MP becomes 1024 px on its longest side
    (SAM clicks and saving take a fraction of the time, the scene a fraction of the space; training
    sees 512 or 1024 px anyway).  The upload itself is deleted unless ``keep_original``.  Returns
    the image to use and the upload's size."""
    picture = load_image(upload)  # turned as its EXIF says, RGB
    size = picture.size
    if keep_original or max(size) <= WORKING_SIDE:
        return upload, size
    picture.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.LANCZOS)
    jpeg = upload.suffix.lower() in (".jpg", ".jpeg")
    small = upload.with_name(f"{upload.stem}-{WORKING_SIDE}{'.jpg' if jpeg else '.png'}")
    with io.atomic_path(small) as tmp:
        picture.save(tmp, format="JPEG" if jpeg else "PNG", **({"quality": 95} if jpeg else {}))
    upload.unlink(missing_ok=True)
    return small, size


def open_scene(workspace: Workspace, folder: str) -> Draft:
    """A scene folder of the workspace (img.* and mask0.png, ...) with one uploaded-mask concept per mask."""
    path = workspace.inside(folder)
    image, masks = find_scene_files(path)
    draft = new_draft(image)
    words = workspace.scene_info(path).get("init_tokens") or []
    for i, mask_path in enumerate(masks):
        draft.concepts.append(Concept(mask_file=workspace.relative(mask_path), mask=to_image_size(load_mask(mask_path), draft.size),
                                      init_word=words[i] if i < len(words) else ""))
    draft.origin = workspace.relative(path)
    return draft


class SamSession:
    """One SAM model kept loaded between clicks, with the image embedded once (per image)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.key: tuple[str, str] | None = None
        self.image: Path | None = None
        self.sam = None

    def segment(self, checkpoint: str, device: str, image: Path, prompt_text: tuple[str, str]) -> np.ndarray:
        from bas.core.model import resolve_device
        from bas.plugins.sam_masks import Sam, check_prompt, parse_box, parse_point

        option, text = prompt_text
        prompt = parse_point(text) if option == "--point" else parse_box(text)
        with self.lock:
            if self.key != (checkpoint, device):
                self.release()
                self.sam = Sam(checkpoint, resolve_device(device))
                self.key = (checkpoint, device)
            if self.image != image:
                picture = load_image(image)
                check_prompt(prompt, *picture.size)
                self.sam.embed(picture)
                self.image = image
            check_prompt(prompt, *self.sam.image.size)
            mask = self.sam.segment(prompt)
        if not mask.any():
            raise BasError(f"SAM found nothing at {prompt.name}; click on the object itself, add points, or drag a box around it.")
        return mask.astype(np.float32)

    def release(self) -> None:
        """Free the model (before an extraction needs the memory)."""
        self.sam, self.key, self.image = None, None, None


def to_pixels(draft: Draft, fx: float, fy: float) -> tuple[float, float]:
    """A click at fractions of the picture's width and height, in image pixels."""
    w, h = draft.size
    return min(int(max(fx, 0.0) * w), w - 1), min(int(max(fy, 0.0) * h), h - 1)


def add_point(draft: Draft, fx: float, fy: float, positive: bool, segment) -> str:
    """Add a point to the selected concept and segment it again; ``segment(prompt)`` is SAM's."""
    concept = draft.current
    x, y = to_pixels(draft, fx, fy)
    note = f" (its uploaded mask {concept.mask_file} is replaced by SAM's)" if concept.mask_file else ""
    if concept.mask_file:
        concept.prompts, concept.mask_file = [], None
    if not positive and not concept.box and not any(label for _, _, label in concept.points):
        raise BasError("A negative point marks what a concept is not; first click on the concept (positive) or drag a box around it.")
    concept.prompts.append(("point", round(x), round(y), int(positive)))
    try:
        concept.mask = segment(concept.sam_prompt())
    except BasError:
        concept.prompts.pop()
        raise
    return f"{draft.labels()[draft.selected]}: {'point' if positive else 'negative point'} at {round(x)},{round(y)}{note}."


def set_box(draft: Draft, fx0: float, fy0: float, fx1: float, fy1: float, segment) -> str:
    concept = draft.current
    (x0, y0), (x1, y1) = to_pixels(draft, min(fx0, fx1), min(fy0, fy1)), to_pixels(draft, max(fx0, fx1), max(fy0, fy1))
    x1, y1 = x1 + 1, y1 + 1  # the box includes the pixel the drag ended on
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise BasError("That box is too small; drag from one corner of the object to the opposite corner.")
    if concept.mask_file:
        concept.prompts, concept.mask_file = [], None
    previous = list(concept.prompts)
    concept.prompts = [p for p in concept.prompts if p[0] != "box"] + [("box", round(x0), round(y0), round(x1), round(y1))]
    try:
        concept.mask = segment(concept.sam_prompt())
    except BasError:
        concept.prompts = previous
        raise
    return f"{draft.labels()[draft.selected]}: box {round(x0)},{round(y0)} to {round(x1)},{round(y1)}."


def undo(draft: Draft, segment) -> str:
    concept = draft.current
    if not concept.prompts:
        return "Nothing to undo for this concept."
    concept.prompts.pop()
    concept.mask = segment(concept.sam_prompt()) if concept.prompts else None
    return f"{draft.labels()[draft.selected]}: removed the last prompt."


def add_mask_file(draft: Draft, path: Path, name: str) -> str:
    """An uploaded mask PNG becomes a concept (the selected one, if it has nothing yet); one of
    another size is resized to the image's, and the message says so."""
    loaded = load_mask(path)
    mask = to_image_size(loaded, draft.size)
    (h, w), (iw, ih) = loaded.shape[:2], draft.size
    note = ""
    if (w, h) != (iw, ih):
        note = f" It is {w}x{h}, the image {iw}x{ih}: it was resized to fit"
        note += (", and its shape differs from the image's, so it is stretched; check that it is this image's mask."
                 if abs(w / h - iw / ih) > 0.01 * iw / ih else ".")
    concept = draft.current if (draft.concepts and not draft.current.prompts and draft.current.mask is None) else None
    if concept is None:
        check_room(draft)
        draft.concepts.append(Concept())
        draft.selected = len(draft.concepts) - 1
        concept = draft.current
    concept.mask, concept.mask_file, concept.prompts = mask, name, []
    return f"{draft.labels()[draft.selected]}: mask from {name}.{note}"


PAINTED = "painted with the brush"


def brush_value(draft: Draft, folder: Path) -> dict:
    """The brush's picture: the image at the page's size, and the selected concept's mask (if any)
    as a white layer to paint on and erase from.  Both are PNG files in ``folder`` named by their
    content and written whole: gradio rewrites a cached copy of a picture it is sent as pixels in
    place, under the same name each time, while a browser may still be reading the previous one."""
    picture = load_image(draft.image)
    factor = min(1.0, DISPLAY_MAX_SIDE / max(picture.size))
    size = (max(1, round(picture.width * factor)), max(1, round(picture.height * factor)))
    picture = picture.resize(size, Image.BICUBIC) if factor < 1.0 else picture
    alpha = np.zeros(size[::-1], np.uint8)
    if draft.concepts and draft.current.mask is not None:
        alpha = np.asarray(Image.fromarray((np.clip(draft.current.mask, 0, 1) * 255).round().astype(np.uint8)).resize(size, Image.BILINEAR))
    layer = Image.fromarray(np.dstack([np.full(size[::-1] + (3,), 255, np.uint8), alpha]), "RGBA")
    return {"background": str(png_file(picture.convert("RGBA"), folder)), "layers": [str(png_file(layer, folder))], "composite": None}


def png_file(picture: Image.Image, folder: Path) -> Path:
    import hashlib

    buffer = stdio.BytesIO()
    picture.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = Path(folder) / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.is_file():
        with io.atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return path


def set_painted_mask(draft: Draft, value: dict | None) -> str:
    """The mask painted with the brush (what is painted, at any opacity, is the concept) becomes the
    selected concept's, at the image's size; SAM's prompts for it are dropped."""
    layers = [np.asarray(layer) for layer in (value or {}).get("layers") or [] if layer is not None]
    if not layers:
        raise BasError("Nothing is painted; pick the brush, paint over the concept, then press 'Use the painted mask'.")
    alpha = np.zeros(layers[0].shape[:2], np.float32)
    for layer in layers:
        alpha = np.maximum(alpha, (layer[..., 3] if layer.ndim == 3 and layer.shape[2] == 4 else layer.reshape(layer.shape[:2] + (-1,))[..., 0]) / 255.0)
    if not (alpha > 0.5).any():
        raise BasError("Nothing is painted; pick the brush, paint over the concept, then press 'Use the painted mask'.")
    mask = to_image_size((alpha > 0.5).astype(np.float32), draft.size)
    concept = draft.current
    concept.mask, concept.mask_file, concept.prompts = (mask > 0.5).astype(np.float32), PAINTED, []
    return f"{draft.labels()[draft.selected]}: mask {PAINTED} ({int((concept.mask > 0).sum())} pixels)."


def check_room(draft: Draft) -> None:
    if len(draft.concepts) >= MAX_CONCEPTS:
        raise BasError(f"A scene holds at most {MAX_CONCEPTS} concepts; remove one first.")


def new_concept(draft: Draft) -> str:
    if draft.concepts and draft.concepts[-1].mask is None:
        draft.selected = len(draft.concepts) - 1
        return f"{draft.labels()[draft.selected]} is empty: click on the next concept."
    check_room(draft)
    draft.concepts.append(Concept())
    draft.selected = len(draft.concepts) - 1
    return f"{draft.labels()[draft.selected]}: click on the concept, or drag a box around it."


def remove_concept(draft: Draft) -> str:
    if not draft.concepts:
        return "There is no concept to remove."
    label = draft.labels()[draft.selected]
    del draft.concepts[draft.selected]
    draft.selected = max(0, min(draft.selected, len(draft.concepts) - 1))
    return f"Removed {label}; the concepts after it moved up one handle."


def cleaned(draft: Draft, cleanup: MaskCleanup) -> list[np.ndarray]:
    """Each concept's mask after cleanup (an empty one for a concept without a mask yet)."""
    w, h = draft.size
    out = []
    for concept in draft.concepts:
        mask = concept.mask if concept.mask is not None else np.zeros((h, w), np.float32)
        out.append(cleanup.apply(mask) if cleanup.active and concept.mask is not None else mask)
    return out


def render(draft: Draft, cleanup: MaskCleanup) -> Image.Image:
    """``preview.png`` of the current masks, with every prompt drawn: points (green on the concept,
    red off it) and boxes in their concept's colour; the selected concept's prompts are larger."""
    picture = load_image(draft.image)
    preview = render_preview(picture, cleaned(draft, cleanup), draft.labels())
    factor = min(1.0, DISPLAY_MAX_SIDE / max(preview.size))
    if factor < 1.0:
        preview = preview.resize((round(preview.width * factor), round(preview.height * factor)), Image.BICUBIC)
    scale = preview.width / draft.size[0]
    draw = ImageDraw.Draw(preview)
    for k, concept in enumerate(draft.concepts):
        colour = PALETTE[k % len(PALETTE)]
        r = 6 if k == draft.selected else 4
        if concept.box:
            x0, y0, x1, y1 = (v * scale for v in concept.box)
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=3 if k == draft.selected else 2)
        for x, y, label in concept.points:
            cx, cy = x * scale, y * scale
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(40, 200, 60) if label else (220, 40, 40), outline=(255, 255, 255), width=2)
    return preview


def data_url(image: Image.Image) -> str:
    buffer = stdio.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def set_init_word(draft: Draft | None, label: str | None, word: str | None) -> bool:
    """Give the concept ``label`` (the selected one when None) the init word ``word``; False when there is none."""
    if draft is None or not draft.concepts:
        return False
    labels = draft.labels()
    concept = draft.concepts[labels.index(label)] if label in labels else draft.current
    concept.init_word = (word or "").strip()
    return True


def init_words(draft: Draft) -> list[str]:
    """One word per concept for ``--init-token`` (the default word where one is blank), or none at all."""
    words = [c.init_word.strip() for c in draft.concepts]
    if not any(words):
        return []
    for word in words:
        if word and len(word.split()) != 1:
            raise BasError(f"The init word '{word}' is not one word; give a single word such as 'bear'.")
    return [w or DEFAULT_INIT_TOKEN for w in words]


def save(draft: Draft, workspace: Workspace, name: str, cleanup_options: dict, overwrite: bool, sam_model: str,
         device: str = "auto") -> tuple[Path, list[Path], str]:
    """Write the scene as ``bas run --scene`` reads it: ``scenes/NAME/{img.png, mask0.png, ..., preview.png}``
    through ``bas masks``'s own code (its checks included), and ``scene.json`` with the init words and
    prompts.  Returns the folder, the files and the ``bas masks`` command that makes the same scene."""
    from bas.core.plugins import Plugins

    folder = workspace.scene_dir(name)
    if not draft.concepts or any(c.mask is None for c in draft.concepts):
        empty = next((label for label, c in zip(draft.labels(), draft.concepts) if c.mask is None), None)
        raise BasError(f"{empty} has no mask yet; click on its concept, upload a mask for it, or remove it." if empty
                       else "The scene has no concept yet; click on one in the picture or upload a mask PNG.")
    words = init_words(draft)
    staging = workspace.tmp / f"scene-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        masks = []
        for i, concept in enumerate(draft.concepts):
            masks.append(staging / f"mask{i}.png")
            Image.fromarray((np.clip(concept.mask, 0, 1) * 255).round().astype(np.uint8)).save(masks[-1])
        # the image too: an opened scene saved again under its name lives in the folder that bas masks replaces
        image = staging / f"image{draft.image.suffix}"
        shutil.copyfile(draft.image, image)
        plugins = Plugins([])
        config = make_masks_config(plugins, {"out": folder, "image": image, "overwrite": overwrite, "masks": masks, **cleanup_options}, [])
        try:
            written = make_masks(config, plugins)  # the folder as a whole: no older image or mask stays beside the new ones
        except BasError as exc:  # name the concept, not the page's staging folder
            text = str(exc)
            for label, path in zip(draft.labels(), masks):
                text = text.replace(str(path), f"the mask of {label}")
            raise BasError(text.replace(str(image), "the image")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prompts = [c.sam_prompt() for c in draft.concepts]
    info = {"init_tokens": words, "prompts": [list(p) if p else None for p in prompts],
            "masks_from": [c.mask_file for c in draft.concepts], "sam_model": sam_model}
    io.write_json(folder / "scene.json", info)
    command = scene_command(workspace, folder, prompts, sam_model, cleanup_options, device)
    return folder, written + [folder / "scene.json"], command


def scene_command(workspace: Workspace, folder: Path, prompts: list, sam_model: str, cleanup_options: dict, device: str) -> str:
    """``cd WORKSPACE`` and the ``bas masks`` command that makes the scene saved in ``folder`` again,
    into a folder beside it (``NAME-cli``: ``--out`` may not hold the image it reads).  A scene of SAM
    prompts only is made from its prompts, with the same cleanup; any other (uploaded or painted
    masks) from its saved masks, which already had their cleanup."""
    from bas.ui.commands import masks_args, shell

    relative = workspace.relative(folder)
    image, out = f"{relative}/img.png", f"{relative}-cli"
    args = masks_args(image, prompts, out, sam_model, cleanup_options) if all(prompts) else None
    if args is not None and device not in ("", "auto"):
        args[-2:-2] = ["--device", device]
    if args is None:
        args = ["--image", image, *[w for i in range(len(prompts)) for w in ("--mask", f"{relative}/mask{i}.png")], "--out", out]
    return f"cd {shell([workspace.root])}\nbas masks {shell(args)}"


def sam_status(checkpoint: str) -> tuple[bool, str]:
    """Whether the SAM checkpoint can be loaded without a download, and a line that says so and how to make it so."""
    import os

    path = Path(checkpoint).expanduser()
    if path.is_dir():
        ready = (path / "config.json").is_file()
        return ready, (f"SAM: ready ({checkpoint})." if ready else f"SAM: {checkpoint} is not a SAM checkpoint folder (no config.json); "
                       "give another in the SAM checkpoint field, or paint masks with the brush.")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(checkpoint, "config.json"), str)
    except Exception:  # not a hub id either
        cached = False
    if cached:
        return True, f"SAM: ready ({checkpoint}, from the hub cache)."
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False, (f"SAM: {checkpoint} is not downloaded and this machine is offline: paint masks with the brush or upload them, "
                       "or download it elsewhere (huggingface-cli download facebook/sam-vit-base) and give its folder in the SAM checkpoint field.")
    return False, (f"SAM: {checkpoint} is downloaded at the first click (about 400 MB, a minute); "
                   "or paint masks with the brush, or upload them.")


def scene_summary(draft: Draft) -> str:
    lines = []
    for label, concept in zip(draft.labels(), draft.concepts):
        if concept.mask_file:
            what = f"mask {concept.mask_file}"
        elif concept.prompts:
            what = "SAM " + " ".join(concept.sam_prompt())
        else:
            what = "no mask yet"
        word = f", init word '{concept.init_word}'" if concept.init_word else ""
        lines.append(f"- `{label}`: {what}{word}")
    return "\n".join(lines) or "No concept yet: click on an object in the picture, or upload a mask PNG."
