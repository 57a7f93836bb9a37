"""A run report a person looks at: OUT/report/ with loss curves, attention maps, validation grids.

At the end of each phase it writes the loss curve of every term (``loss-phase1.png``) and each
handle's cross-attention map over the input image (``attention-phase1.png``); with
``--validation-prompt`` (as diffusers' scripts: sampling costs time, so only when asked) a grid
of samples per checkpoint (``validation-phase1-step00400.png``, at the end of each phase and
every ``--validate-every`` steps).  ``index.html`` ties them together.  Per step it only counts, so
it costs nothing between checkpoints.  Other observers with ``on_images(run, phase, step,
images)`` receive each validation grid (the tensorboard plugin logs them).
"""

from __future__ import annotations

import html
import re
import warnings
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

from bas import hookimpl
from bas.core import io
from bas.core.errors import BasError

REPORT_DIR = "report"
VALIDATION = re.compile(r"validation-phase(\d)-step(\d+)\.png")


def validation_name(phase: int, step: int) -> str:
    return f"validation-phase{phase}-step{step:05d}.png"


def save_figure(fig, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_losses(history: list[dict], phase: int, path: Path) -> None:
    """One panel per term (the total first), the raw values and a moving average."""
    from matplotlib.figure import Figure

    keys = ["loss"] + [k for k in history[0] if k not in ("step", "loss")]
    steps = np.array([h["step"] for h in history])
    fig = Figure(figsize=(4.2 * len(keys), 3.2))  # a fixed layout: constrained layout costs more than the plot
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.16, top=0.8, wspace=0.25)
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        values = np.array([h.get(key, np.nan) for h in history], dtype=float)
        ax.plot(steps, values, lw=0.8, alpha=0.4, color="C0", label="per step")
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, lw=1.6, color="C1", label=f"mean of {window}")
            ax.legend(fontsize=7)
        ax.set_title("total loss" if key == "loss" else f"{key} (weighted)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"phase {phase}")
    save_figure(fig, path)


def plot_attention(image: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor, labels: list[str], phase: int, path: Path) -> None:
    """The input image, then each handle's map over it with its mask's outline."""
    from matplotlib.figure import Figure

    size = image.shape[-1]
    picture = ((image.permute(1, 2, 0).cpu().float() + 1) / 2).clamp(0, 1).numpy()
    maps = F.interpolate(maps[:, None].cpu().float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    n = len(labels)
    fig = Figure(figsize=(2.6 * (n + 1), 2.9))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.82, wspace=0.05)
    axes = fig.subplots(1, n + 1, squeeze=False)[0]
    axes[0].imshow(picture)
    axes[0].set_title("input", fontsize=9)
    for ax, m, mask, label in zip(axes[1:], maps, masks.cpu().float().numpy(), labels):
        ax.imshow(picture)
        ax.imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.contour(mask, levels=[0.5], colors="white", linewidths=1)
        ax.set_title(label, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"cross-attention at the end of phase {phase} (white: mask)", fontsize=10)
    save_figure(fig, path)


def labelled_grid(rows: list[list[Image.Image]], labels: list[str], caption: str) -> Image.Image:
    """A row of samples per prompt, each under a strip with its prompt."""
    w, h = rows[0][0].size
    strip = 14
    grid = Image.new("RGB", (w * max(len(r) for r in rows), 18 + len(rows) * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), caption, fill="black")
    for y, (row, label) in enumerate(zip(rows, labels)):
        top = 18 + y * (h + strip)
        draw.text((4, top + 1), label, fill="black")
        for x, tile in enumerate(row):
            grid.paste(tile, (x * w, top + strip))
    return grid


class Report:
    def __init__(self, config):
        o = config.options
        self.every = o.get("validate_every", 0)
        self.prompts = list(o.get("validation_prompts") or ())
        if self.every and not self.prompts:
            raise BasError("--validate-every needs something to sample; add --validation-prompt \"a photo of <asset0>\".")
        self.num_images = o.get("num_validation_images", 2)
        self.steps = o.get("validation_inference_steps", 25)
        for name in ("validate_every", "num_validation_images", "validation_inference_steps"):
            if o.get(name, 0) < 0:
                raise BasError(f"--{name.replace('_', '-')} must be 0 or more, not {o[name]}.")

    def on_run_start(self, run):
        self.dir = run.out / REPORT_DIR
        if not run.config.resume:  # an overwritten run's curves and grids would mix with these
            for old in [*self.dir.glob("*-phase*.png"), self.dir / "index.html"]:
                old.unlink(missing_ok=True)
        from bas.core.handles import check_prompt_fits, check_prompt_handles

        for prompt in self.prompts:
            check_prompt_handles(prompt, run.tokens)
            for encoder in run.components.text_encoders:  # every tokenizer the family uses
                check_prompt_fits(encoder.tokenizer, prompt, "--validation-prompt")

    def on_step(self, run, step):
        if self.every and step.step % self.every == 0 and step.step < step.total_steps:
            self.validate(run, step.phase, step.step)

    def on_phase_end(self, run, phase):
        history = run.history[f"phase{phase}"]
        if history:
            plot_losses(history, phase, self.dir / f"loss-phase{phase}.png")
        from bas.plugins.attention_loss import handle_attention_maps

        try:
            maps = handle_attention_maps(run, res=run.config.options.get("attention_res"))
        except BasError as exc:  # a model without layers at that size: the run itself is fine
            warnings.warn(f"The report has no attention maps: {exc}", stacklevel=1)
        else:
            labels = [t + (" (background)" if run.scene.background and i == len(run.tokens) - 1 else "") for i, t in enumerate(run.tokens)]
            plot_attention(run.scene.image, run.scene.masks, maps, labels, phase, self.dir / f"attention-phase{phase}.png")
        steps = run.config.phase1_steps if phase == 1 else run.config.phase2_steps
        self.validate(run, phase, steps)
        write_index(run, self.dir)

    def on_run_end(self, run):
        write_index(run, self.dir)

    def validate(self, run, phase: int, step: int) -> None:
        if not (self.num_images and self.steps and self.prompts):
            return
        from bas.generation.sampling import sample_run

        seeds = [run.config.seed + i for i in range(self.num_images)]
        rows = sample_run(run, self.prompts, seeds, steps=self.steps)
        grid = labelled_grid(rows, self.prompts, f"phase {phase}, step {step}; seeds {', '.join(map(str, seeds))}")
        io.save_image(self.dir / validation_name(phase, step), grid)
        images = {prompt: row for prompt, row in zip(self.prompts, rows)}
        for observer in run.resolved.observers:
            if observer is not self and hasattr(observer, "on_images"):
                observer.on_images(run, phase, step, images)


def write_index(run, directory: Path) -> None:
    """``index.html`` linking whatever the report folder holds now (resumed runs included)."""
    e = html.escape
    rows = [("base model", run.model), ("weights", run.resolved.strategy_name if run.config.phase2_steps else "handles only"),
            ("steps", f"phase 1: {run.config.phase1_steps}, phase 2: {run.config.phase2_steps}"), ("seed", run.config.seed)]
    rows += [(t, name) for t, name in zip(run.tokens, run.scene.mask_names)]
    rows += [(k, f"{v:.1f} s") for k, v in run.times.items()]
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>bas report: {e(Path(run.config.out).name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:80em}img{max-width:100%;border:1px solid #ddd}"
        "td{padding:.2em 1em .2em 0}figure{margin:1em 0}</style></head><body>",
        f"<h1>bas report: {e(Path(run.config.out).name)}</h1>", "<table>",
    ]
    parts += [f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in rows]
    parts.append("</table>")

    def section(title: str, files: list[Path], caption) -> None:
        if files:
            parts.append(f"<h2>{e(title)}</h2>")
            parts.extend(f'<figure><img src="{e(f.name)}" alt="{e(caption(f))}"><figcaption>{e(caption(f))}</figcaption></figure>' for f in files)

    section("Loss", sorted(directory.glob("loss-phase*.png")), lambda f: f"loss terms, {f.stem.split('-')[1]}")
    section("Cross-attention of each handle", sorted(directory.glob("attention-phase*.png")), lambda f: f"end of {f.stem.split('-')[1]}")

    def checkpoint(f: Path) -> str:
        m = VALIDATION.fullmatch(f.name)
        return f"phase {m.group(1)}, step {int(m.group(2))}"

    section("Validation samples", sorted(f for f in directory.glob("validation-*.png") if VALIDATION.fullmatch(f.name)), checkpoint)
    parts.append("</body></html>")
    directory.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(directory / "index.html") as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")


@hookimpl
def bas_run_options():
    return [
        click.Option(["--validation-prompt", "validation_prompts"], multiple=True,
                     help="Sample this prompt into the report at the end of each phase (repeatable), as diffusers' --validation_prompt."),
        click.Option(["--validate-every"], type=int, default=0, show_default=True,
                     help="Also sample the validation prompts every N steps (0: only at the end of each phase)."),
        click.Option(["--num-validation-images"], type=int, default=2, show_default=True, help="Samples per validation prompt (seeds seed, seed+1, ...; 0: none)."),
        # not --validation-steps: in diffusers' scripts that means --validate-every (bas/option_hints.py answers it)
        click.Option(["--validation-inference-steps"], type=int, default=25, show_default=True,
                     help="Sampling steps of each validation sample (with the family's sampler and guidance, as bas generate's defaults)."),
    ]


@hookimpl
def bas_register_observers(register):
    register("report", Report, description="OUT/report/: loss curves, attention maps, validation grids, index.html")
