"""Generating images with a finished run: base model + the run's weights + its handles."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from safetensors.torch import load_file

from bas.core import io
from bas.core.errors import BasError
from bas.core.handles import check_prompt_handles, install_handles
from bas.core.model import DTYPES, load_pipeline, resolve_device, resolve_precision
from bas.core.plugins import Plugins


def read_run(out: Path) -> dict:
    out = Path(out)
    path = out / "run.json"
    if not path.is_file():
        raise BasError(f"{out} is not a finished bas run (it has no run.json); pass the --out folder of a completed `bas run`.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BasError(f"{path} is not valid JSON ({exc}); re-run `bas run` to rewrite it.") from exc


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe version of a prompt: no separators, no dots, nothing that escapes a folder."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:length].strip("-") or "image"


def image_stem(prompt: str) -> str:
    """The file name (without ``-seedS.png``) of a prompt's images: its slug, and when the slug had to be
    cut short, a hash of the whole prompt, so that long prompts differing only at the end do not collide."""
    full = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()
    short = slug(prompt)
    if full == short:
        return short
    return f"{short}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


def load_run_pipeline(out: Path, device: str = "auto", precision: str = "auto"):
    """The run's base model with its weights and handles applied, ready to sample."""
    out = Path(out)
    info = read_run(out)
    dev = resolve_device(device)
    dtype = DTYPES[resolve_precision(precision, dev)]

    def load(model):
        return load_pipeline(model, dev, dtype)

    if info.get("weights"):
        plugins = Plugins(info.get("plugin_names") or [])
        strategy = plugins.registry("weight strategy").get(info["weights"], "this run's weights").factory
        from bas.core.training import RunConfig

        pipe = strategy(RunConfig(out=out, options=info["config"].get("options", {}))).load_pipeline(out, info, load)
    else:
        pipe = load(info["model"])
    handles = load_file(str(out / "handles.safetensors"))
    install_handles(pipe.tokenizer, pipe.text_encoder, handles)
    pipe.text_encoder.to(dev)
    return pipe, info


# name -> (diffusers scheduler class, extra config); DDIM is the paper's sampler
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise BasError(f"Unknown scheduler '{name}'; choose one of: {', '.join(SCHEDULERS)}.")


def make_scheduler(name: str, config):
    check_scheduler(name)
    import diffusers

    cls, extra = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **extra)


def all_handles_prompt(handles: list[str]) -> str:
    """The prompt naming every handle, as training phrases it: image variations of the whole scene."""
    from bas.core.training import PROMPT_PREFIX

    return PROMPT_PREFIX + " and ".join(handles)


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise BasError(f"Prompts file {path} does not exist; pass a text file with one prompt per line.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise BasError(f"Prompts file {path} holds no prompt; write one prompt per line.")
    return prompts


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """One image with ``rows`` laid out as given (all tiles the size of the first)."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w, len(rows) * h), "white")
    for y, row in enumerate(rows):
        for x, tile in enumerate(row):
            grid.paste(tile.convert("RGB").resize((w, h)), (x * w, y * h))
    return grid


def grid_name(prompts: list[str], seeds: list[int]) -> str:
    more = f"-and-{len(prompts) - 1}-more" if len(prompts) > 1 else ""
    return f"grid-{slug(prompts[0])}{more}-seed{seeds[0]}.png"


def check_size(width: int | None, height: int | None) -> None:
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value < 8 or value % 8):
            raise BasError(f"{name} must be a positive multiple of 8 (such as 512), not {value}.")


def lora_kwargs(pipe, lora_scale: float) -> dict:
    """``cross_attention_kwargs`` that scale the run's adapters; an error if it has none to scale."""
    if lora_scale == 1.0:
        return {}
    if not any(pipe.get_list_adapters().values()):
        raise BasError("--lora-scale only applies to runs with LoRA weights; this run has none, so leave it out.")
    return {"cross_attention_kwargs": {"scale": lora_scale}}


def generate_images(
    out: Path,
    prompts: list[str],
    *,
    num_images: int = 4,
    seed: int = 0,
    seeds: list[int] | None = None,
    steps: int = 50,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
    scheduler: str = "ddim",
    width: int | None = None,
    height: int | None = None,
    lora_scale: float = 1.0,
    grid: bool = True,
    out_dir: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    on_image: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Sample images per prompt (DDIM by default, the paper's sampler); returns the PNG paths.

    Seeds are ``seeds`` or ``seed, seed+1, ...`` (``num_images`` of them).  Each image is
    ``out_dir/<image_stem(prompt)>-seed<S>.png``; ``on_image(path)`` is called as each one is
    written (progress).  With ``grid`` and more than one image, a grid (a row per prompt, a column
    per seed) is written beside the single images and its path is returned last.
    """
    out = Path(out)
    info = read_run(out)
    if not prompts:
        raise BasError("No prompt was given; pass a prompt such as \"a photo of <asset0>\" or --prompts-file.")
    for prompt in prompts:
        check_prompt_handles(prompt, info["handles"])
    seeds = list(seeds) if seeds else [seed + i for i in range(num_images)]
    if num_images < 1 or steps < 1:
        raise BasError("--num-images and --steps must be at least 1.")
    check_size(width, height)
    check_scheduler(scheduler)  # before the model loads

    pipe, info = load_run_pipeline(out, device, precision)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    extra = lora_kwargs(pipe, lora_scale)
    out_dir = Path(out_dir) if out_dir else out / "samples"
    res = info.get("resolution")
    written, rows = [], []
    for prompt in prompts:
        row = []
        for s in seeds:
            generator = torch.Generator(pipe.device).manual_seed(s)
            with torch.no_grad():
                image = pipe(
                    prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                    generator=generator, height=height or res, width=width or res, **extra,
                ).images[0]
            path = out_dir / f"{image_stem(prompt)}-seed{s}.png"
            io.save_image(path, image)
            written.append(path)
            if on_image:
                on_image(path)
            row.append(image)
        rows.append(row)
    if grid and len(written) > 1:
        path = out_dir / grid_name(prompts, seeds)
        io.save_image(path, image_grid(rows))
        written.append(path)
    return written
