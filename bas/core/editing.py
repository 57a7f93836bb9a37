"""Local editing by example (``bas edit``): put a learned concept into a masked region of any image.

Blended latent diffusion (Avrahami, Fried, Lischinski, SIGGRAPH 2023) with the run's pipeline:
DDIM sampling of the prompt in which, after every step, the latents outside the mask are replaced
by the input image's latents noised to the same timestep, so the new content is generated inside
the mask in the context of what surrounds it.  The decoded result is composited over the input
with the mask, so pixels outside it are the input's (the VAE does not reconstruct them exactly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from bas.core import io
from bas.core.errors import BasError
from bas.core.generation import lora_kwargs, read_run, slug
from bas.core.handles import check_prompt_fits, check_prompt_handles
from bas.core.sampling import decode, denoise, to_pil
from bas.core.scene import _square, load_image, load_mask


def load_edit_inputs(image_path: Path, mask_path: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image (1, 3, R, R) in [-1, 1] and the mask (1, 1, R, R) in [0, 1], cropped as ``bas run`` crops."""
    image = load_image(image_path)
    mask = load_mask(mask_path)
    pil = Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype(np.uint8), mode="L").resize(image.size, Image.BILINEAR)
    image_t = torch.from_numpy(np.asarray(_square(image, resolution, Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0)
    mask_t = torch.from_numpy(np.asarray(_square(pil, resolution, Image.BILINEAR), dtype=np.float32) / 255.0)
    if not (mask_t > 0.5).any():
        raise BasError(f"{mask_path} marks nothing to edit (no pixel above 0.5 after cropping); paint the region in white.")
    return image_t.permute(2, 0, 1)[None], mask_t[None, None]


def edit_images(
    out: Path,
    prompt: str,
    image: Path,
    mask: Path,
    *,
    num_images: int = 1,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
    lora_scale: float = 1.0,
    out_dir: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> list[Path]:
    """Edit the masked region of ``image`` to show ``prompt``; returns the PNG paths."""
    from diffusers import DDIMScheduler

    from bas.core.generation import load_run_pipeline

    out = Path(out)
    info = read_run(out)
    check_prompt_handles(prompt, info["handles"])
    if num_images < 1 or steps < 1:
        raise BasError("--num-images and --steps must be at least 1.")
    res = info["resolution"]
    image_t, mask_t = load_edit_inputs(image, mask, res)
    pipe, info = load_run_pipeline(out, device, precision)
    for text in [prompt] + ([negative_prompt] if negative_prompt else []):
        check_prompt_fits(pipe.tokenizer, text)
    extra = lora_kwargs(pipe, lora_scale)
    dev = pipe.device
    guided = guidance > 1.0
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, dev, 1, guided, negative_prompt, lora_scale=extra.get("cross_attention_kwargs", {}).get("scale"))
        vae = pipe.vae
        source = vae.encode(image_t.to(dev, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    # every latent cell the mask touches is generated (the paper dilates the mask the same way)
    factor = res // source.shape[-1]
    inside = F.max_pool2d((mask_t > 0.5).float(), factor).to(dev)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out_dir = Path(out_dir) if out_dir else out / "edits"
    written = []
    for s in range(seed, seed + num_images):
        noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(s)).to(dev)

        def blend(latents, t_next, noise=noise):
            known = source if t_next is None else scheduler.add_noise(source, noise, t_next.reshape(1))
            return inside * latents + (1 - inside) * known

        scheduler.set_timesteps(steps, device=dev)
        start = blend(noise, scheduler.timesteps[0])  # outside the mask, start from the input noised to the first step
        with torch.no_grad():
            latents = denoise(pipe.unet, scheduler, cond, uncond if uncond is not None else cond, start, steps, guidance,
                              blend=blend, **extra)
            result = decode(vae, latents).float().cpu()
        composite = mask_t * result + (1 - mask_t) * image_t
        path = out_dir / f"edit-{slug(prompt)}-seed{s}.png"
        io.save_image(path, to_pil(composite)[0])
        written.append(path)
    return written
