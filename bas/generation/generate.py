"""Generating images with a finished run: base model + the run's weights + its handles."""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from bas.core import checks, io
from bas.core.errors import BasError
from bas.core.failures import is_out_of_memory
from bas.core.family import ModelFamily, python_str
from bas.core.handles import check_prompt_fits, check_prompt_handles, install_handles
from bas.core.model import DTYPES, load_pipeline, resolve_device, resolve_precision
from bas.core.runs import (SavedConfig, all_handles_prompt, read_run, read_weights, run_family, run_model, run_plugins,  # noqa: F401 (re-exported)
                           slug)


def image_stem(prompt: str) -> str:
    """The file name (without ``-seedS.png``) of a prompt's images: its slug, and when the slug had to be
    cut short, a hash of the whole prompt, so that long prompts differing only at the end do not collide."""
    full = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()
    short = slug(prompt)
    if full == short:
        return short
    return f"{short}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


@contextlib.contextmanager
def quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def load_run_pipeline(out: Path, device: str = "auto", precision: str = "auto"):
    """The run's base model (its family's diffusers pipeline) with its weights and handles applied, ready to sample."""
    out = Path(out)
    info = read_run(out)
    dev = resolve_device(device)
    dtype = DTYPES[resolve_precision(precision, dev)]
    plugins = run_plugins(info)
    family = run_family(info, plugins, out)

    def load(model):
        with run_model(out):  # a model that cannot be loaded is named as the run's (generate, edit, eval and export take no --model)
            return load_pipeline(model, dev, dtype, family, quantize=info.get("quantize") or "none")

    if info.get("weights"):
        strategy = plugins.registry("weight strategy").get(info["weights"], "this run's weights").factory
        try:
            with quiet_diffusers():  # it logs a failed LoRA load as an error before raising it: the one line is bas's
                pipe = strategy(SavedConfig.of(out, info)).load_pipeline(out, info, load)
        except (RuntimeError, ValueError, KeyError) as exc:  # torch: "size mismatch for ..."; peft: target modules not found
            if isinstance(exc, BasError) or is_out_of_memory(exc):
                raise
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else type(exc).__name__)
            raise BasError(f"{out}'s {info['weights']} weights do not fit the {family.name} model '{info['model']}' its run.json names ({detail[:300]}); "
                           "run.json names another family or model than the run was trained with: restore the folder or re-run `bas run`.") from exc
    else:
        pipe = load(info["model"])
    encoders = family.pipeline_text_encoders(pipe)
    install_handles(encoders, read_weights(io.inside(out, "handles.safetensors", str(out))))
    for encoder in encoders:
        encoder.model.to(dev)
    return pipe, info


# name -> (diffusers scheduler class, extra config); DDIM is the paper's sampler.  The flow-matching
# sampler is for flow-matching families (FLUX), the others for DDPM-type ones (``ModelFamily.schedulers``).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
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


def family_schedulers(family) -> list[str]:
    """The samplers a family takes: its own list, else every DDPM-type one."""
    return list(family.schedulers) if family is not None and family.schedulers is not None else [n for n in SCHEDULERS if not n.startswith("flow-")]


def check_scheduler(name: str, family=None) -> None:
    if name not in SCHEDULERS:
        raise BasError(f"Unknown scheduler '{name}'; choose one of: {', '.join(SCHEDULERS)}.")
    allowed = family_schedulers(family)
    if family is not None and name not in allowed:
        raise BasError(f"--scheduler {name} does not sample {family.name} models; use {' or '.join(allowed)} (or leave --scheduler out).")


def sampling_defaults(family, scheduler: str | None, guidance: float | None) -> tuple[str, float]:
    """``--scheduler`` and ``--guidance``, the family's defaults where not given (DDIM and 7.5 for SD)."""
    scheduler = scheduler or family.default_scheduler
    check_scheduler(scheduler, family)
    return scheduler, family.default_guidance if guidance is None else guidance


def run_sampling_defaults(family, info: dict, scheduler: str | None, guidance: float | None, steps: int | None) -> tuple[str, float, int]:
    """``--scheduler``, ``--guidance`` and ``--steps`` for sampling a run: where not given, those of its
    base model's variant (FLUX.1-schnell: 4 steps, guidance 0), else its family's; steps checked."""
    variant = family.variant_sampling(str(info.get("model", "")))
    scheduler, guidance = sampling_defaults(family, scheduler, variant.get("guidance") if guidance is None else guidance)
    steps = int(variant.get("steps", family.default_steps)) if steps is None else steps
    checks.check_integer("steps", steps, 1)
    return scheduler, guidance, steps


SAMPLING_STEPS = ModelFamily.default_steps  # bas generate's, bas edit's and bas eval's --steps (a variant may have its own: FLUX.1-schnell 4)


def sampling_code(family, info: dict, prompt: str, out_file: str = "sample.png", device: str = "cuda") -> tuple[list[str], list[str]]:
    """What ``bas generate`` does by default, as plain-diffusers lines for a model card: (the names to
    import from diffusers, the lines). The lines follow ``pipe = ...`` and sample ``prompt`` with the
    family's (or its variant's) sampler, guidance and steps, the run's resolution and seed 0 on ``device``,
    so the image is the one ``bas generate`` writes as ``...-seed0.png``."""
    scheduler, guidance, steps = run_sampling_defaults(family, info, None, None, None)
    cls, extra = SCHEDULERS[scheduler]
    options = "".join(f", {k}={v!r}" for k, v in extra.items())
    res = info.get("resolution")
    size = f", height={res}, width={res}" if res else ""
    return [cls], [
        f"pipe.scheduler = {cls}.from_config(pipe.scheduler.config{options})  # bas generate's sampler for {family.name}",
        f'generator = torch.Generator("{device}").manual_seed(0)',
        f"image = pipe({python_str(prompt)}, num_inference_steps={steps}, guidance_scale={guidance}{size}, generator=generator).images[0]",
        f"image.save({python_str(out_file)})",
    ]


def make_scheduler(name: str, config):
    check_scheduler(name)
    import diffusers

    cls, extra = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **extra)


MAX_PROMPTS_FILE = 10 * 2**20


def read_prompt_lines(path: Path, what: str = "one prompt per line") -> list[tuple[int, str]]:
    """``(line number, text)`` of the lines of a prompts file that hold something: blank lines and lines
    starting with # are skipped.  ``bas generate --prompts-file``, ``bas edit --prompts-file`` and ``bas eval
    --prompts`` read their files here; ``what`` says what a line holds, in messages."""
    path = Path(path)
    if path.is_dir():
        raise BasError(f"Prompts file {path} is a folder; pass a text file with {what}.")
    if not path.is_file():
        raise BasError(f"Prompts file {path} does not exist; pass a text file with {what}.")
    if path.stat().st_size > MAX_PROMPTS_FILE:
        raise BasError(f"Prompts file {path} is {path.stat().st_size:,} bytes; a prompts file is text of at most {MAX_PROMPTS_FILE // 2**20} MB, "
                       f"{what}.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BasError(f"Prompts file {path} is not UTF-8 text; save it as plain text with {what}.") from None
    except OSError as exc:
        raise BasError(f"Prompts file {path} cannot be read ({exc.strerror or exc}); pass a readable text file with {what}.") from None
    if "\0" in text:
        raise BasError(f"Prompts file {path} is not a text file (it holds NUL bytes); pass plain text with {what}.")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if not lines:
        raise BasError(f"Prompts file {path} holds no prompt; write {what}.")
    return lines


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    return [line for _, line in read_prompt_lines(path)]


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


def sampling_seeds(seed: int, seeds, num_images: int) -> list[int]:
    """The seeds of ``generate`` and ``edit``: ``seeds``, else ``seed, seed+1, ...`` (``num_images`` of them),
    each one torch's generators take.  The command line and the Python API both pass here."""
    checks.check_integer("num_images", num_images, 1, checks.MAX_IMAGES)
    if seeds:
        if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
            raise BasError(f"--seeds must be a list of whole numbers such as [1, 7, 42], not {seeds!r}.")
        seeds = list(seeds)
        for s in seeds:
            checks.check_seed(s, name="seeds")
        return seeds
    checks.check_seed(seed, num_images)
    return [seed + i for i in range(num_images)]


def check_size(width: int | None, height: int | None) -> None:
    for name, value in (("--width", width), ("--height", height)):
        if value is not None:
            checks.check_side(name, value)


def check_prompts_fit(pipe, family, texts: list[str]) -> None:
    """Refuse a prompt whose handle one of the family's tokenizers would cut off (``check_prompt_fits``)."""
    for encoder in family.pipeline_text_encoders(pipe):
        for text in texts:
            check_prompt_fits(encoder.tokenizer, text)


def lora_kwargs(pipe, lora_scale: float, family) -> dict:
    """The pipeline argument (``cross_attention_kwargs`` for UNet families) that scales the run's
    adapters; an error if it has none to scale."""
    if lora_scale == 1.0:
        return {}
    if not any(pipe.get_list_adapters().values()):
        raise BasError("--lora-scale only applies to runs with LoRA weights; this run has none, so leave it out.")
    return {family.lora_scale_argument: {"scale": lora_scale}}


def generate_images(
    out: Path,
    prompts: list[str],
    *,
    num_images: int = 4,
    seed: int = 0,
    seeds: list[int] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
    width: int | None = None,
    height: int | None = None,
    lora_scale: float = 1.0,
    grid: bool = True,
    out_dir: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    on_image: Callable[[Path], None] | None = None,
    batch_size: int = 1,
) -> list[Path]:
    """Sample images per prompt (the family's sampler by default: DDIM, the paper's, for SD and SDXL;
    ``guidance`` the family's default, 7.5 for them); returns the PNG paths.

    Seeds are ``seeds`` or ``seed, seed+1, ...`` (``num_images`` of them).  Each image is
    ``out_dir/<image_stem(prompt)>-seed<S>.png``; ``on_image(path)`` is called as each one is
    written (progress).  ``batch_size`` images are sampled at once (faster where memory allows; each still
    from its own seed's noise, so it matches the one drawn alone up to rounding: a level in a few pixels).  With ``grid`` and more than one image, a grid (a row per prompt, a column
    per seed) is written beside the single images and its path is returned last.
    """
    out = Path(out)
    info = read_run(out)
    if not prompts:
        raise BasError("No prompt was given; pass a prompt such as \"a photo of <asset0>\" or --prompts-file.")
    for prompt in prompts:
        check_prompt_handles(prompt, info["handles"])
    seeds = sampling_seeds(seed, seeds, num_images)
    checks.check_integer("batch_size", batch_size, 1, checks.MAX_IMAGES)
    check_size(width, height)
    family = run_family(info, out=out)
    scheduler, guidance, steps = run_sampling_defaults(family, info, scheduler, guidance, steps)  # before the model loads
    family.check_sampling(negative_prompt)
    out_dir = io.check_output_folder(Path(out_dir) if out_dir else out / "samples", "--out-dir")  # before sampling
    names = [out_dir / f"{image_stem(prompt)}-seed{s}.png" for prompt in prompts for s in seeds]
    io.check_images_replaceable(names + ([out_dir / grid_name(prompts, seeds)] if grid and len(names) > 1 else []), "--out-dir")

    pipe, info = load_run_pipeline(out, device, precision)
    check_prompts_fit(pipe, family, prompts + ([negative_prompt] if negative_prompt else []))
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    extra = lora_kwargs(pipe, lora_scale, family)
    res = info.get("resolution")
    written, images = [], {}
    pairs = [(prompt, s) for prompt in prompts for s in seeds]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        generators = [torch.Generator(pipe.device).manual_seed(s) for _, s in chunk]  # each image its own seed's noise
        asked = [prompt for prompt, _ in chunk]
        if len(chunk) == 1:  # one image: the call as diffusers' own examples make it
            asked, generators = asked[0], generators[0]
        negative = negative_prompt if len(chunk) == 1 or not negative_prompt else [negative_prompt] * len(chunk)
        with torch.no_grad():
            drawn = pipe(
                asked, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                generator=generators, height=height or res, width=width or res, **extra,
            ).images
        for (prompt, s), image in zip(chunk, drawn):
            path = out_dir / f"{image_stem(prompt)}-seed{s}.png"
            record = {"command": "generate", "prompt": prompt, "negative_prompt": negative_prompt, "seed": s, "steps": steps, "guidance": guidance,
                      "scheduler": scheduler, "lora_scale": lora_scale}
            io.save_image(path, image, record)
            written.append(path)
            if on_image:
                on_image(path)
            images[prompt, s] = image
    rows = [[images[prompt, s] for s in seeds] for prompt in prompts]
    if grid and len(written) > 1:
        path = out_dir / grid_name(prompts, seeds)
        io.save_image(path, image_grid(rows), {"command": "generate", "grid": {"prompts": list(prompts), "seeds": list(seeds)}})
        written.append(path)
    return written


def generate(out, prompts, **options) -> list[Path]:
    """The Python API of ``bas generate`` (:func:`bas.generate`): images from a finished run; ``prompts`` is one
    prompt or a list.  Returns PNG paths."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return generate_images(Path(out), prompts, **options)
