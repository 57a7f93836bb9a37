"""Masks from Segment Anything (transformers): one concept per --point or --box, or the --auto N largest segments."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from bas import hookimpl
from bas.core.errors import BasError, command_line
from bas.core.model import resolve_device
from bas.core.scene import SceneInput, load_image

DEFAULT_CHECKPOINT = "facebook/sam-vit-base"
# transformers classes per checkpoint family (config.json's model_type)
FAMILIES = {"sam": ("SamModel", "SamProcessor"), "sam2": ("Sam2Model", "Sam2Processor")}
AUTO_GRID = 16  # automatic mode prompts SAM with a 16x16 grid of points, as SAM's own generator with fewer points
AUTO_MAX_COVERAGE = 0.9  # a segment covering more of the image is background, not an object
AUTO_SAME_SEGMENT = 0.5  # a segment lying half or more inside a larger one already chosen is not distinct
AUTO_MIN_SCORE = 0.8  # SAM's predicted IoU below which an automatic segment is not trusted (SAM's own: 0.88)
DECODER_BATCH = 64  # prompts per mask-decoder call in automatic mode


NEGATIVE = "no:"  # a point prefixed with it marks what the concept is not (SAM's negative point)


@dataclass
class Prompt:
    """One concept's prompt in image pixels: points (several mean one object; ``labels`` 1 for a
    point on the concept, 0 for a negative point off it), a box, or a box refined by points."""

    text: str  # as typed, for messages
    points: list[tuple[float, float]] | None = None
    box: tuple[float, float, float, float] | None = None
    labels: list[int] | None = None  # one per point; None: all positive

    @property
    def name(self) -> str:
        return f"SAM {'box' if self.box else 'point'} {self.text}"

    @property
    def point_labels(self) -> list[int]:
        return list(self.labels) if self.labels is not None else [1] * len(self.points or ())


def _numbers(text: str, count: int, option: str, example: str) -> list[float]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        raise BasError(f"{option} takes {example} in image pixels, not '{text}'.")
    return values


POINT_EXAMPLE = "X,Y (join the points of one concept with +, as 120,340+150,360; no:X,Y is a point off it)"


def _points(parts: list[str], option: str) -> tuple[list[tuple[float, float]], list[int]]:
    points, labels = [], []
    for part in parts:
        part = part.strip()
        negative = part.startswith(NEGATIVE)
        points.append(tuple(_numbers(part[len(NEGATIVE):] if negative else part, 2, option, POINT_EXAMPLE)))
        labels.append(0 if negative else 1)
    return points, labels


def parse_point(text: str) -> Prompt:
    """``X,Y`` or several points of one concept joined with ``+``: ``X,Y+X,Y``; ``no:X,Y`` is a
    negative point (on something the mask must leave out)."""
    points, labels = _points(str(text).split("+"), "--point")
    if 1 not in labels:
        raise BasError(f"--point {text} has only negative (no:) points; give at least one point on the concept.")
    return Prompt(text=str(text), points=points, labels=labels)


def parse_box(text: str) -> Prompt:
    """``X0,Y0,X1,Y1``, optionally refined by points: ``X0,Y0,X1,Y1+X,Y+no:X,Y``."""
    first, *rest = str(text).split("+")
    x0, y0, x1, y1 = _numbers(first, 4, "--box", "X0,Y0,X1,Y1 (top-left and bottom-right corners; +X,Y or +no:X,Y adds points)")
    points, labels = _points(rest, "--box") if rest else (None, None)
    return Prompt(text=str(text), box=(x0, y0, x1, y1), points=points, labels=labels)


def check_prompt(prompt: Prompt, width: int, height: int) -> None:
    """Points must lie on the image, boxes inside it with their top-left corner first."""
    for x, y in prompt.points or ():
        if not (0 <= x < width and 0 <= y < height):
            raise BasError(
                f"Point {x:g},{y:g} of {'--box' if prompt.box else '--point'} {prompt.text} is outside the image ({width}x{height}); "
                f"give x in [0, {width}) and y in [0, {height}), in pixels from the top-left corner."
            )
    if prompt.box:
        x0, y0, x1, y1 = prompt.box
        if x1 <= x0 or y1 <= y0:
            axis = "x1 < x0" if x1 < x0 else "y1 < y0" if y1 < y0 else "zero width or height"
            raise BasError(f"--box {prompt.text} has {axis}; give X0,Y0,X1,Y1 with the top-left corner first and the bottom-right second.")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise BasError(f"--box {prompt.text} reaches outside the image ({width}x{height}); keep 0 <= X0 < X1 <= {width} and 0 <= Y0 < Y1 <= {height}.")


def not_found_message(checkpoint: str) -> str:
    where = "pass it with --model (bas masks) or --sam-model (bas run)"
    if checkpoint.startswith((".", "/", "~")) or "\\" in checkpoint or checkpoint.count("/") != 1:
        return (
            f"SAM checkpoint folder {checkpoint} does not exist; give a folder written by save_pretrained, or get "
            f"{DEFAULT_CHECKPOINT} with `{command_line('hf', 'download', DEFAULT_CHECKPOINT, '--local-dir', 'DIR')}` and {where}."
        )
    return (
        f"SAM checkpoint '{checkpoint}' is not in the Hugging Face cache and could not be downloaded (offline?); "
        f"get it with `{command_line('hf', 'download', checkpoint)}` on a machine with internet, or download it into a folder "
        f"(`{command_line('hf', 'download', checkpoint, '--local-dir', 'DIR')}`) and {where}."
    )


class Sam:
    """A SAM (or SAM 2) checkpoint on a device, with the image embedded once for every prompt."""

    def __init__(self, checkpoint: str, device):
        import transformers
        from transformers import AutoConfig

        path = Path(checkpoint).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise BasError(f"{path} is not a SAM checkpoint folder (it has no config.json); pass a folder written by save_pretrained, or the hub id {DEFAULT_CHECKPOINT}.")
        source = str(path) if path.exists() else checkpoint
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise BasError(not_found_message(checkpoint)) from exc
        if config.model_type not in FAMILIES:
            raise BasError(f"'{checkpoint}' holds a '{config.model_type}' model, not Segment Anything; pass a SAM checkpoint such as {DEFAULT_CHECKPOINT}.")
        if config.model_type == "sam2" and importlib.util.find_spec("torchvision") is None:
            raise BasError(f"SAM 2 checkpoints need torchvision for their image processor; install the torchvision that matches your torch, or use a SAM checkpoint such as {DEFAULT_CHECKPOINT}.")
        model_class, processor_class = (getattr(transformers, name) for name in FAMILIES[config.model_type])
        try:
            self.processor = processor_class.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise BasError(f"'{checkpoint}' has no SAM processor files (processor_config.json or preprocessor_config.json); save one next to the model with SamProcessor.save_pretrained.") from exc
        try:
            self.model = model_class.from_pretrained(source).to(device).eval()
        except (OSError, ValueError) as exc:
            raise BasError(not_found_message(checkpoint)) from exc
        self.family = config.model_type
        self.device = device

    def embed(self, image) -> None:
        self.image = image
        encoding = self.processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            self.embeddings = self.model.get_image_embeddings(encoding["pixel_values"].to(self.device))

    def _decode(self, encoding, multimask: bool, start: int = 0, stop: int | None = None):
        """Mask logits ``(1, prompts, masks, h, w)`` and IoU scores ``(1, prompts, masks)``."""
        prompts = {}
        for key in ("input_points", "input_labels", "input_boxes"):
            if key in encoding:
                value = encoding[key][:, start:stop].to(self.device)
                prompts[key] = value if key == "input_labels" else value.float()
        with torch.inference_mode():
            out = self.model(image_embeddings=self.embeddings, multimask_output=multimask, **prompts)
        return out.pred_masks.float(), out.iou_scores.float()

    def _full_size(self, logits, encoding):
        """Binary masks at the image's size from logits ``(prompts, masks, h, w)``."""
        if self.family == "sam":
            masks = self.processor.post_process_masks([logits.cpu()], encoding["original_sizes"], encoding["reshaped_input_sizes"])
        else:
            masks = self.processor.post_process_masks([logits.cpu()], encoding["original_sizes"])
        return masks[0].numpy().astype(bool)

    def segment(self, prompt: Prompt) -> np.ndarray:
        """One boolean mask at the image's size for one concept's prompt."""
        kwargs = {}
        if prompt.points:
            kwargs = {"input_points": [[list(map(list, prompt.points))]], "input_labels": [[prompt.point_labels]]}
        if prompt.box:
            kwargs["input_boxes"] = [[list(prompt.box)]]
        encoding = self.processor(images=self.image, return_tensors="pt", **kwargs)
        # One point is ambiguous (part or whole?): ask for SAM's three masks and keep the best
        # scored, as SAM's predictor does; several points or a box ask for one.
        multimask = not prompt.box and len(prompt.points or ()) == 1
        logits, scores = self._decode(encoding, multimask)
        best = int(scores[0, 0].argmax())
        return self._full_size(logits[0, :, best : best + 1], encoding)[0, 0]

    def automatic(self, count: int, grid: int, min_score: float) -> list[np.ndarray]:
        """The ``count`` largest distinct segments SAM finds from a ``grid`` x ``grid`` of points."""
        width, height = self.image.size
        xs, ys = (np.arange(grid) + 0.5) * width / grid, (np.arange(grid) + 0.5) * height / grid
        points = [[[float(x), float(y)]] for y in ys for x in xs]
        encoding = self.processor(images=self.image, input_points=[points], input_labels=[[[1]] * len(points)], return_tensors="pt")
        candidates, scores = [], []
        for start in range(0, len(points), DECODER_BATCH):
            logits, iou = self._decode(encoding, True, start, start + DECODER_BATCH)
            candidates.append((logits[0] > 0).cpu())
            scores.append(iou[0].cpu())
        low_res = torch.cat(candidates).numpy()  # (points, 3, h, w)
        n_points, n_masks, h, w = low_res.shape
        valid_h, valid_w = self._valid_low_res(encoding, h, w)
        flat = low_res[:, :, :valid_h, :valid_w].reshape(n_points * n_masks, valid_h, valid_w)
        chosen = distinct_largest(flat, torch.cat(scores).reshape(-1).numpy(), count, min_score)
        if len(chosen) < count:
            raise BasError(
                f"SAM found {len(chosen)} distinct segment(s) but --auto asked for {count}; "
                "ask for fewer, lower --auto-min-score, or prompt each object with --point or --box."
            )
        masks = []
        for index in chosen:  # decode the chosen prompts again: cheaper than keeping every logit map
            point, which = divmod(int(index), n_masks)
            logits, _ = self._decode(encoding, True, point, point + 1)
            masks.append(self._full_size(logits[0, :, which : which + 1], encoding)[0, 0])
        return masks

    def _valid_low_res(self, encoding, h: int, w: int) -> tuple[int, int]:
        """The part of SAM's low-resolution masks that shows the image, not its padding."""
        if "reshaped_input_sizes" not in encoding:  # SAM 2 stretches the image, no padding
            return h, w
        padded = encoding["pixel_values"].shape[-2:]
        rh, rw = (int(v) for v in encoding["reshaped_input_sizes"][0])
        return max(1, round(rh * h / padded[0])), max(1, round(rw * w / padded[1]))


def distinct_largest(masks: np.ndarray, scores: np.ndarray, count: int, min_score: float) -> list[int]:
    """Indices of the ``count`` largest masks that score at least ``min_score``, are not background
    (at most ``AUTO_MAX_COVERAGE`` of the image) and are distinct: less than ``AUTO_SAME_SEGMENT``
    of each lies inside a larger mask already chosen (this also drops parts of chosen objects)."""
    flat = masks.reshape(len(masks), -1)
    area = flat.sum(axis=1)
    usable = (scores >= min_score) & (area > 0) & (area <= AUTO_MAX_COVERAGE * flat.shape[1])
    chosen: list[int] = []
    for i in sorted(np.flatnonzero(usable), key=lambda i: (-area[i], i)):
        if all((flat[i] & flat[j]).sum() < AUTO_SAME_SEGMENT * area[i] for j in chosen):
            chosen.append(int(i))
            if len(chosen) == count:
                break
    return chosen


class SamMasks:
    """One concept per --point/--box prompt, or the --auto N largest distinct segments."""

    loads_a_model = True  # bas.core.training.check_run leaves its masks to the run

    def __init__(self, config):
        options = config.options
        self.prompts = [parse_point(p) for p in options.get("points") or ()] + [parse_box(b) for b in options.get("boxes") or ()]
        self.auto = options.get("auto")
        self.auto_grid = options.get("auto_grid") or AUTO_GRID
        self.auto_min_score = options.get("auto_min_score", AUTO_MIN_SCORE)
        # `bas masks --model` sets config.mask_model; `bas run` keeps --model for the diffusion model
        self.checkpoint = options.get("sam_model") or getattr(config, "mask_model", None) or DEFAULT_CHECKPOINT
        if self.auto is not None and self.prompts:
            raise BasError("--auto finds segments by itself; give either --auto N or --point/--box prompts, not both.")
        if self.auto is None and not self.prompts:
            raise BasError("sam-masks needs a prompt per concept: --point X,Y or --box X0,Y0,X1,Y1 (repeat per concept), or --auto N for the N largest segments.")
        if self.auto is not None and self.auto < 1:
            raise BasError(f"--auto must be 1 or more segments, not {self.auto}.")
        if self.auto_grid < 1:
            raise BasError(f"--auto-grid must be 1 or more points per side, not {self.auto_grid}.")

    def load(self, config) -> SceneInput:
        if config.image is None:
            raise BasError("No input image; pass --image IMG.")
        image = load_image(Path(config.image))
        for prompt in self.prompts:  # before loading the model: a typo fails at once
            check_prompt(prompt, *image.size)
        device = resolve_device(config.device)
        sam = Sam(self.checkpoint, device)
        sam.embed(image)
        if self.auto is not None:
            masks = sam.automatic(self.auto, self.auto_grid, self.auto_min_score)
            names = [f"SAM segment {i} (--auto {self.auto})" for i in range(len(masks))]
        else:
            masks, names = [], []
            for prompt in self.prompts:
                mask = sam.segment(prompt)
                if not mask.any():
                    raise BasError(f"SAM found nothing at {prompt.name} (its mask is empty); move the prompt onto the object, add points, or use --box.")
                masks.append(mask)
                names.append(prompt.name)
        del sam  # free the segmenter before training loads the diffusion model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return SceneInput(image=image, masks=[m.astype(np.float32) for m in masks], mask_names=names)


@hookimpl
def bas_run_options():
    return [
        click.Option(["--point", "points"], multiple=True, default=(), help="A point X,Y on one concept (repeat per concept; X,Y+X,Y: several points of one concept; +no:X,Y: a point it must leave out)."),
        click.Option(["--box", "boxes"], multiple=True, default=(), help="A box X0,Y0,X1,Y1 around one concept (repeat per concept; concepts from --point come first; +X,Y or +no:X,Y refines it)."),
        click.Option(["--auto"], type=int, default=None, help="No prompts: the N largest distinct segments SAM finds from a grid of points."),
        click.Option(["--auto-grid"], type=int, default=AUTO_GRID, show_default=True, help="Points per side of --auto's prompt grid."),
        click.Option(["--auto-min-score"], type=float, default=AUTO_MIN_SCORE, show_default=True, help="--auto keeps segments whose predicted IoU is at least this."),
        click.Option(["--sam-model"], default=None, help=f"SAM checkpoint, hub id or local folder [default: {DEFAULT_CHECKPOINT}; `bas masks` takes it as --model]."),
    ]


@hookimpl
def bas_register_mask_sources(register):
    register("sam-masks", SamMasks, description="Segment Anything from point or box prompts, or automatic")
