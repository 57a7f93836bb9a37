"""Train bas-mini: a Stable-Diffusion-architecture model of the procedural world, from scratch.

``python -m bas.mini.train --out bas/mini/weights`` (or ``bas-mini-train``) draws a fixed set of
scenes, trains the VAE on them and on half as many again from the whole world (novel colours
and textures included: the VAE reads no caption), with reconstruction + a small KL term on
random crops (the VAE is fully convolutional), caches the scenes' latents, then trains the UNet and the text encoder
together on the DDPM objective with captions that vary in wording and are dropped 10% of the
time (for classifier-free guidance).  The weights kept are an exponential moving average.  The
pipeline is saved in diffusers format (safetensors) every ``--save-every`` steps, so a run cut
short still leaves a usable model, and ``training.json`` beside it records the configuration,
times, device and loss curve.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
from torch.nn import functional as F

from bas.core import io
from bas.mini import world

MAX_TOKENS = 32  # the longest caption is about 22 tokens
LATENT_CHANNELS = 8  # twice SD's 4: an 8x8 latent must still carry stripes and dots


@dataclass
class TrainConfig:
    out: Path = Path("bas/mini/weights")
    seed: int = 0
    num_scenes: int = 12000
    vae_steps: int = 4000  # 1,500 left orange, purple, pink and cyan unreadable (reconstruction MSE 0.046); 4,000 reach 0.015-0.02
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    caption_drop: float = 0.1
    vae_whole_world: bool = True  # the VAE also sees the colours and textures no caption names
    minutes: float = 0.0  # wall-clock cap of the UNet phase (0: none); the run then ends early
    save_every: int = 250
    device: str = "auto"
    threads: int = 1  # on a shared CPU one thread is several times faster than two

    def to_json(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


def build_tokenizer():
    import tempfile

    from transformers import CLIPTokenizer

    from bas.core.tiny import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), words=world.VOCABULARY)
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=MAX_TOKENS)


def build_models(tokenizer):
    """The untrained parts: an 8x VAE (64 px -> 8x8x8), a 3-level UNet (8, 4, 2), a 2-layer CLIP text model."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=world.SIZE, mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=(32, 64, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64, attention_head_dim=(1, 2, 2), norm_num_groups=16, use_linear_projection=True,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    ))
    scheduler = DDIMScheduler(  # Stable Diffusion's noise schedule
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return vae, unet, text_encoder, scheduler


def draw_dataset(count: int, seed: int, whole_world: bool = False) -> tuple[list[world.Scene], torch.Tensor]:
    """``count`` scenes and their images as a uint8 tensor (N, 3, 64, 64): captionable training scenes,
    or with ``whole_world`` scenes with every colour and texture (the VAE must be able to draw
    concepts that no caption names, as Stable Diffusion's VAE can draw any colour)."""
    rng = random.Random(seed)
    scenes = [(world.any_scene if whole_world else world.random_scene)(rng) for _ in range(count)]
    images = np.stack([np.asarray(world.render(s)[0]) for s in scenes])
    return scenes, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


class Log:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {message}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def train_vae(vae, images: torch.Tensor, cfg: TrainConfig, device, log) -> list[dict]:
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.vae_steps)))
    with torch.no_grad():  # start nearly deterministic (posterior std ~0.02): noisy latents would hide the image at first
        vae.quant_conv.bias[LATENT_CHANNELS:] = -8.0
        vae.quant_conv.weight[LATENT_CHANNELS:] *= 0.01
    vae.train().to(device)
    history, c = [], cfg.vae_crop
    for step in range(1, cfg.vae_steps + 1):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x0, y0 = (int(v) for v in torch.randint(0, world.SIZE - c + 1, (2,), generator=gen))
        x = to_unit(images[idx, :, y0 : y0 + c, x0 : x0 + c]).to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        rec = F.mse_loss(recon, x)
        kl = dist.kl().mean()
        loss = rec + cfg.vae_kl_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == cfg.vae_steps:
            history.append({"step": step, "mse": float(rec.detach()), "kl": float(kl.detach())})
            log(f"vae step {step}/{cfg.vae_steps} mse {history[-1]['mse']:.5f} kl {history[-1]['kl']:.1f}")
    return history


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    vae.eval()
    return torch.cat([vae.encode(to_unit(images[i : i + batch]).to(device)).latent_dist.mean.cpu() for i in range(0, len(images), batch)])


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer, scheduler) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    keep = out / "training.json"
    record = keep.read_text() if keep.exists() else None
    with io.atomic_path(out, directory=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if record is not None:
            (tmp / "training.json").write_text(record)


def train(cfg: TrainConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    out = Path(cfg.out)
    log = Log(out.parent / f"{out.name}-train.log")
    record: dict = {"config": cfg.to_json(), "device": str(device), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                    "threads": cfg.threads, "times": {}, "vae_history": [], "unet_history": []}
    t0 = time.perf_counter()
    tokenizer = build_tokenizer()
    vae, unet, text_encoder, scheduler = build_models(tokenizer)
    scenes, images = draw_dataset(cfg.num_scenes, cfg.seed)
    vae_images = draw_dataset(cfg.num_scenes // 2, cfg.seed + 3, whole_world=True)[1] if cfg.vae_whole_world else images[:0]
    record["times"]["draw_s"] = time.perf_counter() - t0
    log(f"drew {len(scenes)} scenes; vae {sum(p.numel() for p in vae.parameters())/1e6:.2f}M, unet {sum(p.numel() for p in unet.parameters())/1e6:.2f}M, "
        f"text {sum(p.numel() for p in text_encoder.parameters())/1e6:.2f}M parameters, device {device}")

    t = time.perf_counter()
    record["vae_history"] = train_vae(vae, torch.cat([images, vae_images]), cfg, device, log)
    latents = encode_all(vae, images, device)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    record["times"]["vae_s"] = time.perf_counter() - t
    log(f"vae done; latents {tuple(latents.shape)}, scaling factor {scale:.4f}")

    # captions tokenized once per wording: the step picks a scene and a random wording of it
    rng = random.Random(cfg.seed + 1)
    ids_cache: dict[str, torch.Tensor] = {}

    def ids_for(caption: str) -> torch.Tensor:
        if caption not in ids_cache:
            ids_cache[caption] = tokenizer(caption, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids[0]
        return ids_cache[caption]

    unet.train().to(device)
    text_encoder.train().to(device)
    vae.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    lr_at = lambda s: min(1.0, s / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.unet_steps) / cfg.unet_steps))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    alphas = scheduler.alphas_cumprod
    t_unet, running, step = time.perf_counter(), None, 0

    def save_ema() -> None:
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        try:
            save_pipeline(out, vae, unet, text_encoder, tokenizer, scheduler)
        finally:
            with torch.no_grad():
                for p, v in zip(params, live):
                    p.copy_(v)

    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=gen)
        x0 = latents[idx].to(device)
        ids = torch.stack([ids_for(world.training_caption(rng, scenes[i], cfg.caption_drop)) for i in idx.tolist()]).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        a = alphas[timesteps].to(device).view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, timesteps.to(device), encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 25 == 0:
            record["unet_history"].append({"step": step, "loss": running, "lr": lr_sched.get_last_lr()[0]})
            log(f"unet step {step}/{cfg.unet_steps} loss {running:.4f} ({(time.perf_counter() - t_unet) / step:.2f}s/step)")
        out_of_time = cfg.minutes and time.perf_counter() - t_unet > cfg.minutes * 60
        if step % cfg.save_every == 0 or step == cfg.unet_steps or out_of_time:
            record["times"]["unet_s"] = time.perf_counter() - t_unet
            record["times"]["total_s"] = time.perf_counter() - t0
            record["unet_steps_done"] = step
            record["final_loss"] = running
            save_ema()
            io.write_json(out / "training.json", record)
            log(f"saved {out} at step {step}")
        if out_of_time:
            log(f"stopping at step {step}: the {cfg.minutes} minute budget is spent")
            break
    return record


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=TrainConfig.out, show_default=True, help="Where the diffusers pipeline and training.json go.")
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--num-scenes", type=int, default=TrainConfig.num_scenes, show_default=True, help="Scenes drawn once and cached (images and latents).")
@click.option("--vae-steps", type=int, default=TrainConfig.vae_steps, show_default=True)
@click.option("--unet-steps", type=int, default=TrainConfig.unet_steps, show_default=True)
@click.option("--unet-batch", type=int, default=TrainConfig.unet_batch, show_default=True)
@click.option("--unet-lr", type=float, default=TrainConfig.unet_lr, show_default=True)
@click.option("--minutes", type=float, default=TrainConfig.minutes, show_default=True, help="Stop the UNet phase after this many minutes (0: run every step).")
@click.option("--save-every", type=int, default=TrainConfig.save_every, show_default=True)
@click.option("--vae-whole-world/--vae-captioned-only", default=TrainConfig.vae_whole_world, show_default=True,
              help="Also train the VAE on scenes with the colours and textures no caption names.")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU where there is one), cpu, cuda.")
@click.option("--threads", type=int, default=TrainConfig.threads, show_default=True, help="CPU threads for torch.")
def main(**values):
    """Train bas-mini on the procedural world and write it as a diffusers pipeline."""
    record = train(TrainConfig(**values))
    click.echo(f"Trained {record['unet_steps_done']} UNet steps in {record['times']['total_s'] / 60:.1f} min; final loss {record['final_loss']:.4f}.")


if __name__ == "__main__":
    main()
