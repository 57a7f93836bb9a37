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

from bas.core import checks, io
from bas.core.errors import BasError
from bas.core.handles import check_prompt_fits, check_prompt_handles, install_handles
from bas.core.model import DTYPES, load_pipeline, resolve_device, resolve_precision
from bas.core.plugins import Plugins


MAX_RUN_JSON = 64 * 2**20  # a run.json holds options and loss histories: a few MB at most
MAX_HANDLES_FILE = 16 * 2**20  # 8 handles of 4096 floats take 128 KB
RUN_FIELDS = {"model": str, "handles": list, "files": list, "resolution": int}


def read_run(out: Path) -> dict:
    """The ``run.json`` of a finished run, after checking that the folder's files agree with it.

    Refused with one line: a folder that is not a finished run (an interrupted one is named as
    such), a damaged ``run.json``, handle names that are not ``<assetN>``, a handles file that does
    not hold exactly the handles ``run.json`` lists, listed files that are missing or leave the
    folder, and files that differ from the sizes and hashes ``run.json`` recorded (a mixed folder).
    An interrupted swap of a newer run into ``out`` is finished (or undone) first.
    """
    from bas.core import checkpoint, runfolder

    out = Path(out)
    runfolder.settle(out)
    path = out / "run.json"
    if not path.is_file():
        if checkpoint.complete_checkpoints(out):
            raise BasError(f"{out} holds an interrupted run, not a finished one; continue it with `bas run ... --resume` (the same options as before).")
        if not out.exists():
            raise BasError(f"{out} does not exist; pass the --out folder of a completed `bas run`.")
        raise BasError(f"{out} is not a finished bas run (it has no run.json); pass the --out folder of a completed `bas run`.")
    if path.stat().st_size > MAX_RUN_JSON:
        raise BasError(f"{path} is {path.stat().st_size:,} bytes, far more than a run.json holds; the folder is damaged, re-run `bas run`.")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise BasError(f"{path} is not valid JSON ({exc}); the folder is damaged, re-run `bas run`.") from exc
    if not isinstance(info, dict):
        raise BasError(f"{path} does not hold a run's record; the folder is damaged, re-run `bas run`.")
    for key, kind in RUN_FIELDS.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise BasError(f"{path} has no valid '{key}'; the folder is damaged, re-run `bas run`.")
    handles = info["handles"]
    if not handles or handles != [f"<asset{i}>" for i in range(len(handles))]:
        raise BasError(f"{path} lists the handles {handles!r}, not <asset0>, <asset1>, ... in order; the folder is damaged, re-run `bas run`.")
    if info.get("background") not in (None, *handles):
        raise BasError(f"{path} names a background handle {info['background']!r} that is not among its handles; re-run `bas run`.")
    if info.get("weights") is not None and not isinstance(info["weights"], str):
        raise BasError(f"{path} has no valid 'weights'; the folder is damaged, re-run `bas run`.")
    if not isinstance(info.get("config", {}), dict) or not isinstance(info.get("config", {}).get("options", {}), dict):
        raise BasError(f"{path} has no valid 'config'; the folder is damaged, re-run `bas run`.")
    checks.check_side(f"{path}'s resolution", info["resolution"])
    for name in info["files"]:
        if not isinstance(name, str) or not io.inside(out, name.rstrip("/"), str(path)).exists():
            raise BasError(f"{out} is incomplete: {name}, which its run.json lists, is missing; restore the folder or re-run `bas run`.")
    if info.get("weights") and not info.get("weight_files", True):
        raise BasError(f"{path} says the run trained {info['weights']} weights but lists no file of them; re-run `bas run`.")
    if "checksums" in info:
        runfolder.verify(out, info["checksums"], out)
    handles_file = out / "handles.safetensors"
    if handles_file.is_file() and handles_file.stat().st_size > MAX_HANDLES_FILE:
        raise BasError(f"{handles_file} is {handles_file.stat().st_size:,} bytes, far more than a few handles take; the folder is damaged, re-run `bas run`.")
    try:
        saved = load_file(str(handles_file))
    except Exception as exc:  # safetensors reports a damaged header or a truncated file with its own errors
        raise BasError(f"{out / 'handles.safetensors'} cannot be read ({type(exc).__name__}: {exc}); the folder is damaged, re-run `bas run`.") from exc
    if sorted(saved) != sorted(handles):
        raise BasError(f"{out} is mixed: handles.safetensors holds {', '.join(sorted(saved)) or 'nothing'} but run.json lists {', '.join(handles)}; "
                       "re-run `bas run` into a new folder.")
    dims = {tuple(t.shape) for t in saved.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1 or not all(torch.isfinite(t.float()).all() for t in saved.values()):
        raise BasError(f"{out / 'handles.safetensors'} does not hold one finite vector per handle; the folder is damaged, re-run `bas run`.")
    return info


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


MAX_PROMPTS_FILE = 10 * 2**20


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise BasError(f"Prompts file {path} does not exist; pass a text file with one prompt per line.")
    if path.stat().st_size > MAX_PROMPTS_FILE:
        raise BasError(f"Prompts file {path} is {path.stat().st_size:,} bytes; a prompts file is text of at most {MAX_PROMPTS_FILE // 2**20} MB, one prompt per line.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BasError(f"Prompts file {path} is not UTF-8 text; save it as plain text with one prompt per line.") from None
    if "\0" in text:
        raise BasError(f"Prompts file {path} is not a text file (it holds NUL bytes); pass plain text with one prompt per line.")
    prompts = [line.strip() for line in text.splitlines()]
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
        if value is not None:
            checks.check_side(name, value)


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
    if num_images < 1 or steps < 1:
        raise BasError("--num-images and --steps must be at least 1.")
    checks.check_seed(seed, 1 if seeds else num_images)
    for s in seeds or []:
        checks.check_seed(s, name="seeds")
    seeds = list(seeds) if seeds else [seed + i for i in range(num_images)]
    check_size(width, height)
    check_scheduler(scheduler)  # before the model loads

    pipe, info = load_run_pipeline(out, device, precision)
    for prompt in prompts + ([negative_prompt] if negative_prompt else []):
        check_prompt_fits(pipe.tokenizer, prompt)
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
