"""Local editing by example (``bas edit``): put a learned concept into a masked region of any image.

Blended Latent Diffusion (Avrahami, Fried, Lischinski, SIGGRAPH 2023), as the script the paper's
repository points to runs it (``scripts/text_editing_stable_diffusion.py`` of
omriav/blended-latent-diffusion, now ``text_editing_SD2.py``):

- the mask is resized to the latent grid with nearest sampling and thresholded at 0.5;
- sampling starts a quarter into the schedule (``blend_start``), from pure noise;
- after every step the latents outside the mask are replaced by the input image's latents
  (the VAE posterior's mean) noised to the step's timestep with *fresh* noise;
- DDIM, 50 steps, guidance 7.5, an empty negative prompt;
- the result is the decoded latents, nothing pasted over them.

Beyond the script: the run's family's pipeline (any family, its conditioning and guidance), the
sampling options of ``bas generate`` (scheduler, seeds, size, prompts, negative prompt, LoRA
scale), and ``composite``, which pastes the input's pixels outside the mask over the result.
The image and mask are centre-cropped to the output's aspect and resized, as ``bas run`` does
(the script resizes without cropping), and each seed's generator draws both the start and the
blending noise (the script draws the blending noise from torch's global generator).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from bas.core import io
from bas.core.errors import BasError
from bas.core.family import ImageSize
from bas.generation.generate import (check_prompts_fit, check_size, lora_kwargs, make_scheduler, read_run, run_family, run_sampling_defaults,
                                 sampling_seeds, slug)
from bas.core.handles import check_prompt_handles
from bas.generation.sampling import decode, denoise, to_pil
from bas.core.scene import check_image_size, load_image, load_mask, mask_at_image_size

DEFAULT_BLEND_START = 0.25  # the script's --blending_start_percentage


def fit(img: Image.Image, width: int, height: int, resample) -> Image.Image:
    """Centre-crop to the aspect of ``width`` x ``height`` and resize to it (a square crop for a square size, as ``bas run``)."""
    w, h = img.size
    if w * height > h * width:  # wider than the target: crop the sides
        side = round(h * width / height)
        box = ((w - side) // 2, 0, (w - side) // 2 + side, h)
    else:
        side = round(w * height / width)
        box = (0, (h - side) // 2, w, (h - side) // 2 + side)
    return img.crop(box).resize((width, height), resample)


def load_edit_inputs(image_path: Path, mask_path: Path, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image (1, 3, H, W) in [-1, 1] and the mask (1, 1, H, W) in [0, 1], cropped to the output's aspect."""
    image = load_image(image_path)
    check_image_size(image, str(image_path))
    mask = load_mask(mask_path)
    pil = mask_at_image_size(str(mask_path), mask, image.size)  # as `bas run` takes a mask of another size
    image_t = torch.from_numpy(np.asarray(fit(image, width, height, Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0)
    mask_t = torch.from_numpy(np.asarray(fit(pil, width, height, Image.BILINEAR), dtype=np.float32) / 255.0)
    if not (mask_t > 0.5).any():
        raise BasError(f"{mask_path} marks nothing to edit (no pixel above 0.5 after cropping); paint the region in white.")
    return image_t.permute(2, 0, 1)[None], mask_t[None, None]


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The script's mask on the latent grid: nearest sampling, then 1 where it is at least 0.5."""
    return (F.interpolate(mask, size=size, mode="nearest") >= 0.5).float()


def pure_noise_scale(scheduler, t: torch.Tensor) -> float:
    """The scale of a start from pure noise at timestep ``t``: 1 for schedulers in DDPM's
    parametrisation (DDIM, as the script), ``sqrt(1 + sigma_t^2)`` for sigma-parametrised ones (Euler, Heun)."""
    if getattr(scheduler, "init_noise_sigma", 1.0) == 1.0:  # flow matching has none: it starts at 1
        return 1.0
    sigma = float(scheduler.add_noise(torch.zeros(1), torch.ones(1), t.reshape(1).cpu()))
    return (1.0 + sigma**2) ** 0.5


def edit_images(
    out: Path,
    prompts,
    image: Path,
    mask: Path,
    *,
    num_images: int = 1,
    seed: int = 0,
    seeds: list[int] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
    width: int | None = None,
    height: int | None = None,
    lora_scale: float = 1.0,
    blend_start: float = DEFAULT_BLEND_START,
    composite: bool = False,
    out_dir: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> list[Path]:
    """Edit the masked region of ``image`` to show each prompt (one or a list); returns the PNG paths,
    per prompt its seeds ``seeds`` or ``seed, seed+1, ...`` (``num_images`` of them)."""
    from bas.generation.generate import load_run_pipeline

    out = Path(out)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    info = read_run(out)
    if not prompts:
        raise BasError("No prompt was given; pass a prompt such as \"a photo of <asset0>\" or --prompts-file.")
    for prompt in prompts:
        check_prompt_handles(prompt, info["handles"])
    seeds = sampling_seeds(seed, seeds, num_images)  # as generate checks them, for the API as for the command line
    if not 0.0 <= blend_start < 1.0:
        raise BasError(f"--blend-start must be at least 0 and below 1 (the script's 0.25), not {blend_start}.")
    check_size(width, height)
    family = run_family(info, out=out)
    scheduler, guidance, steps = run_sampling_defaults(family, info, scheduler, guidance, steps)
    family.check_sampling(negative_prompt)
    res = info["resolution"]
    width, height = width or res, height or res
    image_t, mask_t = load_edit_inputs(image, mask, width, height)  # before the model loads
    out_dir = io.check_output_folder(Path(out_dir) if out_dir else out / "edits", "--out-dir")
    io.check_images_replaceable([out_dir / f"edit-{slug(prompt)}-seed{s}.png" for prompt in prompts for s in seeds], "--out-dir")

    pipe, info = load_run_pipeline(out, device, precision)
    check_prompts_fit(pipe, family, prompts + ([negative_prompt] if negative_prompt else []))
    extra = lora_kwargs(pipe, lora_scale, family)
    dev = pipe.device
    denoiser = getattr(pipe, family.denoiser_name)
    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # as diffusers' pipelines do: these VAEs overflow in fp16
    guided = guidance > 1.0
    with torch.no_grad():
        source = family.scale_latents(vae, vae.encode(image_t.to(dev, vae.dtype)).latent_dist.mean.float())
    inside = latent_mask(mask_t, source.shape[-2:]).to(dev)
    # the script's DDIM counts timesteps from 0 (steps_offset 0: 980, 960, ...)
    config = dict(pipe.scheduler.config, steps_offset=0) if scheduler == "ddim" else pipe.scheduler.config
    written = []
    for prompt in prompts:
        with torch.no_grad():
            scale = extra.get(family.lora_scale_argument, {}).get("scale")
            cond, uncond = family.prompt_conditioning(pipe, prompt, negative_prompt, guided, scale, ImageSize.plain(height, width))
        for s in seeds:
            sched = make_scheduler(scheduler, config)
            family.set_timesteps(sched, steps, dev, source)
            first = int(len(sched.timesteps) * blend_start)
            timesteps = sched.timesteps[first:]
            if hasattr(sched, "set_begin_index"):  # schedulers that count their steps start counting there
                sched.set_begin_index(first)
            generator = torch.Generator().manual_seed(s)
            start = torch.randn(source.shape, generator=generator).to(dev) * pure_noise_scale(sched, timesteps[0])

            def blend(latents, t, generator=generator, sched=sched):
                fresh = torch.randn(source.shape, generator=generator).to(dev)
                known = family.noised(sched, source, fresh, t.reshape(1))
                return latents * inside + known * (1 - inside)

            with torch.no_grad():
                latents = denoise(family, denoiser, sched, cond, uncond, start, guidance, timesteps, blend=blend, **extra)
                result = decode(family, vae, latents).float().cpu()
            if composite:
                result = mask_t * result + (1 - mask_t) * image_t
            path = out_dir / f"edit-{slug(prompt)}-seed{s}.png"
            record = {"command": "edit", "prompt": prompt, "negative_prompt": negative_prompt, "seed": s, "steps": steps, "guidance": guidance,
                      "scheduler": scheduler, "lora_scale": lora_scale, "blend_start": blend_start, "composite": composite}
            io.save_image(path, to_pil(result)[0], record)
            written.append(path)
    return written
