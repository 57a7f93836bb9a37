"""A plain guided sampling loop on model parts, for where a diffusers pipeline does not fit.

Validation images during training sample from the weights as they are mid-run, with the VAE
parked on the CPU; local editing (blended latent diffusion) blends the input back into the
latents after every step.  Generation from a finished run uses the diffusers pipeline instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from bas.core.training import Run

# blend(latents after a step, the next timestep or None after the last step) -> latents
Blend = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def denoise(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float,
            blend: Blend | None = None, **unet_kwargs) -> torch.Tensor:
    """Classifier-free-guided sampling from ``noise`` (B, C, h, w); ``cond``/``uncond`` are (B or 1, T, D)."""
    scheduler.set_timesteps(steps, device=noise.device)
    timesteps = scheduler.timesteps
    latents = noise * scheduler.init_noise_sigma
    b = latents.shape[0]
    guided = guidance > 1.0
    ehs = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)]) if guided else cond.expand(b, -1, -1)
    for i, t in enumerate(timesteps):
        z = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        pred = unet(z.to(unet.dtype), t, encoder_hidden_states=ehs.to(unet.dtype), **unet_kwargs).sample.float()
        if guided:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
        if blend is not None:
            latents = blend(latents, timesteps[i + 1] if i + 1 < len(timesteps) else None)
    return latents


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] to PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (scaled as the UNet sees them) to images in [-1, 1], on the VAE's device and dtype."""
    param = next(vae.parameters())
    return vae.decode(latents.to(param.device, param.dtype) / vae.config.scaling_factor).sample


@torch.no_grad()
def sample_run(run: "Run", prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 7.5) -> list[list[Image.Image]]:
    """Images from the weights and handles as they are now in a training run: a row per prompt.

    DDIM, like the paper's inference.  Training modes and the training random generators are
    left as they were, so validation does not change what the run learns.
    """
    from diffusers import DDIMScheduler

    from bas.core.training import place

    c = run.components
    modes = (c.unet.training, c.text_encoder.training)
    c.unet.eval()
    c.text_encoder.eval()
    scheduler = DDIMScheduler.from_config(c.noise_scheduler.config)
    size = run.resolution // c.vae_scale_factor
    noise = torch.cat([
        torch.randn((1, c.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(s)) for s in seeds
    ]).to(run.device)
    rows = []
    try:
        with run.autocast():
            uncond = c.text_encoder(run.tokenize([""]))[0]
            latents = []
            for prompt in prompts:
                cond = c.text_encoder(run.tokenize([prompt]))[0]
                latents.append(denoise(c.unet, scheduler, cond, uncond, noise, steps, guidance))
        vae_device = next(c.vae.parameters()).device
        vae = place(c.vae, run.device, torch.float32)  # parked on the CPU after latents were cached
        try:
            rows = [to_pil(decode(vae, z.float())) for z in latents]
        finally:
            vae.to(vae_device)
    finally:
        c.unet.train(modes[0])
        c.text_encoder.train(modes[1])
    return rows
