"""A plain guided sampling loop on model parts, for where a diffusers pipeline does not fit.

Validation images during training sample from the weights as they are mid-run, with the VAE
parked on the CPU; local editing (blended latent diffusion) blends the input back into the
latents after every step.  Generation from a finished run uses the family's diffusers pipeline
instead.  The model family makes each step's prediction (its conditioning, its guidance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

from bas.core.family import Conditioning, ImageSize, ModelFamily
from bas.core.model import place

if TYPE_CHECKING:  # pragma: no cover
    from bas.core.training import Run

# blend(latents after the step at timestep t, t) -> latents
Blend = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def denoise(family: ModelFamily, denoiser, scheduler, cond: Conditioning, uncond: Conditioning | None, latents: torch.Tensor,
            guidance: float, timesteps, blend: Blend | None = None, **kwargs) -> torch.Tensor:
    """Guided sampling of ``latents`` (B, C, h, w) over ``timesteps`` (set on ``scheduler``); ``cond`` and
    ``uncond`` (None: no guidance) are for a batch of 1 or B."""
    b = latents.shape[0]
    cond = cond.expand(b)
    uncond = uncond.expand(b) if uncond is not None and guidance > 1.0 else None
    for t in timesteps:
        z = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents  # flow matching has none
        pred = family.guided_prediction(denoiser, z, t, cond, uncond, guidance, **kwargs)
        latents = scheduler.step(pred, t, latents).prev_sample
        if blend is not None:
            latents = blend(latents, t)
    return latents


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] to PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


@torch.no_grad()
def decode(family: ModelFamily, vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (scaled as the denoiser sees them) to images in [-1, 1], on the VAE's device and dtype."""
    param = next(vae.parameters())
    return vae.decode(family.unscale_latents(vae, latents.to(param.device, param.dtype))).sample


@torch.no_grad()
def sample_run(run: "Run", prompts: list[str], seeds: list[int], steps: int = 25, guidance: float | None = None) -> list[list[Image.Image]]:
    """Images from the weights and handles as they are now in a training run: a row per prompt.

    The family's sampling scheduler: DDIM, like the paper's inference, for DDPM-type models.  Training modes and the training random generators are
    left as they were, so validation does not change what the run learns.
    """
    c, family = run.components, run.family
    guidance = family.default_guidance if guidance is None else guidance
    modules = c.trainable_modules().values()
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    scheduler = family.sampling_scheduler(c.noise_scheduler)
    side = run.resolution // c.vae_scale_factor
    size = ImageSize.plain(run.resolution)
    noise = torch.cat([
        torch.randn((1, c.vae.config.latent_channels, side, side), generator=torch.Generator().manual_seed(s)) for s in seeds
    ]).to(run.device)
    rows = []
    try:
        with run.autocast():
            uncond = family.unconditional(c, lambda texts: run.conditioning(run.tokenize(texts), size))
            latents = []
            for prompt in prompts:
                cond = run.conditioning(run.tokenize([prompt]), size)
                family.set_timesteps(scheduler, steps, run.device, noise)
                latents.append(denoise(family, c.denoiser, scheduler, cond, uncond, noise * scheduler.init_noise_sigma, guidance,
                                       scheduler.timesteps))
        vae_device = next(c.vae.parameters()).device
        vae = place(c.vae, run.device, torch.float32)  # parked on the CPU after latents were cached
        try:
            rows = [to_pil(decode(family, vae, z.float())) for z in latents]
        finally:
            vae.to(vae_device)
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    return rows
