"""Generating images with a finished run: base model + the run's weights + its handles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
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


def generate_images(
    out: Path,
    prompts: list[str],
    *,
    num_images: int = 4,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    out_dir: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> list[Path]:
    """Sample ``num_images`` images per prompt with DDIM (the paper's sampler); returns the PNG paths."""
    out = Path(out)
    info = read_run(out)
    for prompt in prompts:
        check_prompt_handles(prompt, info["handles"])
    if num_images < 1 or steps < 1:
        raise BasError("--num-images and --steps must be at least 1.")
    from diffusers import DDIMScheduler

    pipe, info = load_run_pipeline(out, device, precision)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out_dir = Path(out_dir) if out_dir else out / "samples"
    res = info.get("resolution")
    written = []
    for prompt in prompts:
        for i in range(num_images):
            generator = torch.Generator(pipe.device).manual_seed(seed + i)
            with torch.no_grad():
                image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator, height=res, width=res).images[0]
            path = out_dir / f"{slug(prompt)}-seed{seed + i}.png"
            io.save_image(path, image)
            written.append(path)
    return written
