"""Train bas-mini: a Stable-Diffusion-architecture model of the procedural world, from scratch.

``python -m bas.mini.train --out bas/mini/weights`` (or ``bas-mini-train``) is the whole recipe,
one command:

1. draw a fixed set of captioned scenes for the UNet, and one from the whole world for the VAE
   (the novel colours and the dotted texture included, a third of the objects dotted: the VAE
   reads no caption, and extraction needs it to draw what no caption names);
2. train a 4x VAE (64 px -> 16x16x4 latents, so dots 8 px apart survive) on random crops with
   reconstruction + a small KL term (the VAE is fully convolutional), then cache the latents;
3. train the UNet and the text encoder together on the captioned scenes: v-prediction on a
   zero-terminal-SNR noise schedule (at the last step the latent is pure noise, so the model
   must take the background from the caption rather than from the noise's mean), min-SNR loss
   weighting, captions in varied wording and dropped 10% of the time (for classifier-free
   guidance), an exponential moving average of the weights kept.

The pipeline is saved in diffusers format (safetensors) every ``--save-every`` steps, so a run
cut short still leaves a usable model; ``training.json`` beside it records the configuration,
times, device, CPU load and loss curves, and ``<out>-train.log`` the progress.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
from torch.nn import functional as F

from bas.core import io
from bas.exports import formats
from bas.mini import world

MAX_TOKENS = 32  # the longest caption is about 22 tokens


@dataclass
class TrainConfig:
    out: Path = Path("bas/mini/weights")
    seed: int = 0
    num_scenes: int = 20000
    # VAE: 2**(len(vae_channels) - 1) is its reduction; (32, 64, 64) is 4x, 64 px -> 16x16
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    vae_steps: int = 5000
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_scenes: int = 12000  # the VAE's own scenes, from the whole world: every colour and texture, dotted a third of the time
    vae_from: str = ""  # reuse the VAE of this pipeline folder instead of training one (for experiments)
    # UNet: one level per entry, cross-attention at every level
    unet_channels: tuple[int, ...] = (64, 96, 96)
    unet_heads: tuple[int, ...] = (2, 4, 4)  # attention head dimension per level, as diffusers' attention_head_dim
    unet_layers: int = 1
    text_width: int = 64
    text_layers: int = 2
    unet_steps: int = 9000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    caption_drop: float = 0.1
    prediction: str = "v_prediction"  # or epsilon
    zero_snr: bool = True  # rescale the betas so the last timestep is pure noise (Lin et al. 2023)
    snr_gamma: float = 5.0  # min-SNR loss weighting (see loss_weights); 0 = plain MSE
    minutes: float = 0.0  # wall-clock cap of this leg, VAE and UNet stages together (0: none); the run then saves and stops
    stop_after: int = 0  # stop (saving the exact state) after this many steps of this leg, VAE and UNet steps together (0: none)
    save_every: int = 500
    device: str = "auto"
    threads: int = 1  # on a shared CPU one thread is several times faster than two
    resume: bool = False  # continue the UNet phase of the pipeline at ``out`` from its last save

    def to_json(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


# what a resumed run may change: where it writes, how often, its budget and the machine it runs on
RESUMABLE_CHANGES = {"out", "minutes", "stop_after", "save_every", "device", "threads", "resume"}


def state_dir(out: Path) -> Path:
    """The exact training state beside the pipeline (live and EMA weights, AdamW moments, random
    generators), written at every save so ``--resume`` continues bit-identically; removed at the end."""
    return out.parent / f"{out.name}-state"


def save_state(out: Path, step: int, params, ema, opt, gen: torch.Generator, rng: random.Random) -> None:
    from safetensors.torch import save_file

    tensors = {f"live.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    tensors.update({f"ema.{i}": e.detach().cpu().contiguous() for i, e in enumerate(ema)})
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = value.detach().cpu().contiguous()
    tensors["generator"] = gen.get_state()
    version, internal, gauss = rng.getstate()
    with io.atomic_path(state_dir(out), directory=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "python_random": [version, list(internal), gauss]}))


def load_state(out: Path, step: int, params, ema, opt, gen: torch.Generator, rng: random.Random) -> bool:
    """Restore the state saved at ``step``; False when there is none for that step (then the caller rebuilds what it can)."""
    from safetensors.torch import load_file

    folder = state_dir(out)
    try:
        info = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("step") != step:
        return False
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        missing = [k for i in range(len(params)) for k in (f"live.{i}", f"ema.{i}") if k not in tensors] + [k for k in ("generator",) if k not in tensors]
    except Exception as exc:  # a truncated or foreign file: say which, not a traceback
        missing = [f"a readable file ({exc})"]
    if missing:
        raise click.UsageError(f"the training state at {folder} is damaged (no {missing[0]}); delete that folder to resume from the "
                               f"saved weights instead (AdamW's moments then restart).")
    with torch.no_grad():
        for i, (p, e) in enumerate(zip(params, ema)):
            p.copy_(tensors[f"live.{i}"])
            e.copy_(tensors[f"ema.{i}"])
    state = {}
    for i in range(len(params)):
        entries = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if entries:
            state[i] = entries
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    gen.set_state(tensors["generator"])
    version, internal, gauss = info["python_random"]
    rng.setstate((version, tuple(internal), gauss))
    return True


def vae_state_dir(out: Path) -> Path:
    """The VAE stage's exact state (weights, AdamW moments, random generators), while that stage is unfinished."""
    return out.parent / f"{out.name}-vae-state"


def save_vae_state(out: Path, step: int, vae, opt, gen: torch.Generator, record: dict) -> None:
    """The VAE stage's state after ``step``, and ``training.json`` saying so (written last: it is what --resume reads)."""
    from safetensors.torch import save_file

    tensors = {f"vae.{k}": v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    for i, p in enumerate(vae.parameters()):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = value.detach().cpu().contiguous()
    tensors["generator"] = gen.get_state()
    tensors["torch_rng"] = torch.get_rng_state()
    with io.atomic_path(vae_state_dir(out), directory=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step}))
    io.write_json(out / "training.json", {**record, "stage": "vae", "vae_steps_done": step})


def load_vae_state(out: Path, step: int, vae, opt, gen: torch.Generator) -> None:
    from safetensors.torch import load_file

    folder = vae_state_dir(out)
    try:
        if json.loads((folder / "state.json").read_text()).get("step") != step:
            raise ValueError(f"it is not the state of step {step}")
        tensors = load_file(str(folder / "state.safetensors"))
        vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
        state = {}
        for i in range(len(list(vae.parameters()))):
            entries = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if entries:
                state[i] = entries
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        gen.set_state(tensors["generator"])
        torch.set_rng_state(tensors["torch_rng"])
    except Exception as exc:  # missing, truncated or foreign: say which folder, not a traceback
        raise click.UsageError(f"the VAE stage's training state at {folder} is damaged or missing ({exc}); delete {out} and that folder "
                               f"to train afresh.") from None


class Budget:
    """When this leg must stop: after ``minutes`` of wall-clock time or ``stop_after`` steps (VAE and UNet
    steps together), or at the first step boundary after SIGTERM or Ctrl-C (a background job being
    stopped), so that what it saves is an exact state to ``--resume`` from."""

    def __init__(self, cfg: TrainConfig):
        self.t0, self.minutes, self.limit, self.steps, self.signal = time.perf_counter(), cfg.minutes, cfg.stop_after, 0, None

    def step(self) -> None:
        self.steps += 1

    def reason(self) -> str | None:
        if self.signal:
            return f"stopped by {self.signal}"
        if self.minutes and time.perf_counter() - self.t0 > self.minutes * 60:
            return f"the {self.minutes} minute budget is spent"
        if self.limit and self.steps >= self.limit:
            return f"--stop-after {self.limit} steps"
        return None

    def __enter__(self):
        import signal
        import threading

        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._catch)
        return self

    def _catch(self, signum, frame):
        import signal

        if self.signal:  # a second one stops at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def read_previous(cfg: TrainConfig) -> dict:
    """The training.json of the run ``--resume`` continues, checked against this run's options."""
    path = Path(cfg.out) / "training.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        raise click.UsageError(f"--resume needs a pipeline that bas.mini.train saved at {cfg.out} (no readable {path}); run without --resume.") from None
    old = {k: v for k, v in previous.get("config", {}).items() if k not in RESUMABLE_CHANGES}
    new = {k: v for k, v in json.loads(json.dumps(cfg.to_json())).items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise click.UsageError(f"--resume continues the run at {cfg.out} with its own options, but these differ: "
                               f"{', '.join('--' + k.replace('_', '-') for k in changed)}; pass them as before or train afresh.")
    if previous.get("stage") != "vae" and previous.get("unet_steps_done", 0) >= cfg.unet_steps:
        raise click.UsageError(f"the run at {cfg.out} already trained all {cfg.unet_steps} UNet steps; nothing to resume.")
    return previous


def build_tokenizer():
    import tempfile

    from transformers import CLIPTokenizer

    from bas.demo.tiny import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), words=world.VOCABULARY)
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=MAX_TOKENS)


def build_scheduler(cfg: TrainConfig):
    """Stable Diffusion's scaled-linear betas; with ``zero_snr`` rescaled to end at pure noise, sampled from the last step."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type=cfg.prediction, rescale_betas_zero_snr=cfg.zero_snr,
        timestep_spacing="trailing" if cfg.zero_snr else "leading",
    )


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=8, sample_size=world.SIZE, mid_block_add_attention=False,
    )


def build_models(tokenizer, cfg: TrainConfig):
    """The untrained parts: the VAE, a UNet with cross-attention at every level, a small CLIP text model, the scheduler."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(cfg.unet_channels)
    latent = world.SIZE // 2 ** (len(cfg.vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels, block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers, down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cfg.text_width, attention_head_dim=tuple(cfg.unet_heads), norm_num_groups=16, use_linear_projection=True,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width, num_hidden_layers=cfg.text_layers,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=cfg.text_width,
    ))
    return build_vae(cfg), unet, text_encoder, build_scheduler(cfg)


def draw_dataset(count: int, seed: int, whole_world: bool = False) -> tuple[list[world.Scene], torch.Tensor]:
    """``count`` scenes and their images as a uint8 tensor (N, 3, 64, 64): captionable training scenes,
    or with ``whole_world`` scenes with every colour and texture (the VAE must be able to draw
    concepts that no caption names, as Stable Diffusion's VAE can draw any colour)."""
    rng = random.Random(seed)
    scenes = [(world.any_scene if whole_world else world.training_scene)(rng) for _ in range(count)]
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


def cpu_load() -> float | None:
    """The 1-minute load average (how busy the machine was), where the OS tells it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def train_vae(vae, images: torch.Tensor, cfg: TrainConfig, device, log, budget: Budget, record: dict, start: int = 0, stamp=lambda: None) -> bool:
    """Train the VAE from step ``start`` (a resumed stage), appending to ``record["vae_history"]``; False when the
    leg's budget stopped it first (its exact state is then saved)."""
    import warnings

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.vae_steps)))
    with torch.no_grad():  # start nearly deterministic (posterior std ~0.02): noisy latents would hide the image at first
        vae.quant_conv.bias[cfg.latent_channels:] = -8.0
        vae.quant_conv.weight[cfg.latent_channels:] *= 0.01
    if start:
        with warnings.catch_warnings():  # the schedule's position: the step count, without optimizer steps
            warnings.simplefilter("ignore")
            for _ in range(start):
                sched.step()
        load_vae_state(Path(cfg.out), start, vae, opt, gen)
        log(f"resuming the VAE stage at step {start} from {vae_state_dir(Path(cfg.out))}")
    vae.train().to(device)
    history, c, t0, cpu0 = record["vae_history"], cfg.vae_crop, time.perf_counter(), time.process_time()
    for step in range(start + 1, cfg.vae_steps + 1):
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
        budget.step()
        if step % 25 == 0 or step == cfg.vae_steps:
            history.append({"step": step, "mse": float(rec.detach()), "kl": float(kl.detach()), "load": cpu_load()})
            log(f"vae step {step}/{cfg.vae_steps} mse {history[-1]['mse']:.5f} kl {history[-1]['kl']:.1f} "
                f"({(time.perf_counter() - t0) / (step - start):.2f}s/step, {(time.process_time() - cpu0) / (step - start):.2f}s CPU, "
                f"load {history[-1]['load']})")
        stop = budget.reason() if step < cfg.vae_steps else None
        if stop or (step % cfg.save_every == 0 and step < cfg.vae_steps):
            record["times"]["vae_s"] = record["times"].get("vae_s", 0.0) + time.perf_counter() - t0
            record["times"]["vae_cpu_s"] = record["times"].get("vae_cpu_s", 0.0) + time.process_time() - cpu0
            t0, cpu0 = time.perf_counter(), time.process_time()
            stamp()
            save_vae_state(Path(cfg.out), step, vae, opt, gen, record)
            log(f"saved the VAE stage's state at step {step}")
            if stop:
                log(f"stopping at VAE step {step}: {stop}; run the same command with --resume to continue")
                return False
    record["times"]["vae_s"] = record["times"].get("vae_s", 0.0) + time.perf_counter() - t0
    record["times"]["vae_cpu_s"] = record["times"].get("vae_cpu_s", 0.0) + time.process_time() - cpu0
    return True


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
        formats.save_pipeline(pipe, tmp)  # loadable by transformers 4.x too (text_model.* names, vocab.json and merges.txt)
        if record is not None:
            (tmp / "training.json").write_text(record)


def loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight of each sample's loss: min(1, gamma / SNR), 1 everywhere when gamma is 0.

    Nearly clean timesteps (SNR above gamma) are weighted down, so they do not dominate the
    gradient (Hang et al. 2023).  For the epsilon target this is the paper's min(SNR, gamma) / SNR.
    For the v target it is used as is too, rather than the paper's min(SNR, gamma) / (SNR + 1):
    that one is 0 at SNR 0, so on a zero-terminal-SNR schedule the pure-noise step, where
    sampling starts and the background is decided, would never be trained.
    """
    if not gamma:
        return torch.ones(len(timesteps))
    a = alphas_cumprod[timesteps].double()
    snr = a / (1 - a).clamp(min=1e-12)
    return (gamma / snr.clamp(min=1e-12)).clamp(max=1.0).float()


def load_vae(folder: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, subfolder="vae")


def train(cfg: TrainConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    out = Path(cfg.out)
    log = Log(out.parent / f"{out.name}-train.log")
    record: dict = {"config": cfg.to_json(), "device": str(device), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": cfg.threads, "times": {}, "vae_history": [], "unet_history": []}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    previous = read_previous(cfg) if cfg.resume else None
    in_vae = previous is not None and previous.get("stage") == "vae"  # stopped before the UNet stage began
    t0, cpu0 = time.perf_counter(), time.process_time()
    tokenizer = build_tokenizer()
    vae, unet, text_encoder, scheduler = build_models(tokenizer, cfg)  # drawn from the seed: a resumed VAE stage gets the same UNet
    if previous:
        record["legs"] = previous.get("legs", []) + [{k: previous.get(k) for k in ("stage", "vae_steps_done", "unet_steps_done", "device", "machine",
                                                                                     "threads", "torch")}
                                                     | {k: previous.get("times", {}).get(k) for k in ("vae_cpu_s", "unet_s", "cpu_s")}]
        record["times"] = {k: v for k, v in previous.get("times", {}).items() if k in ("draw_s", "vae_s", "vae_cpu_s", "draw_and_vae_cpu_s")}
        record["vae_history"] = previous.get("vae_history", [])
    if previous and not in_vae:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        vae = load_vae(str(out))
        unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(str(out), subfolder="text_encoder")
        prior_times = dict(previous.get("times", {}))
        record.update({k: previous[k] for k in ("unet_history", "parameters") if k in previous})
    elif cfg.vae_from:
        vae = load_vae(cfg.vae_from)
    scenes, images = draw_dataset(cfg.num_scenes, cfg.seed)
    train_vae_now = not cfg.vae_from and (not previous or in_vae)
    vae_images = draw_dataset(cfg.vae_scenes, cfg.seed + 3, whole_world=True)[1] if train_vae_now else None
    if not previous:
        record["times"]["draw_s"] = time.perf_counter() - t0
    count = lambda m: sum(p.numel() for p in m.parameters())
    record["parameters"] = {"vae": count(vae), "unet": count(unet), "text_encoder": count(text_encoder)}
    log(f"drew {len(scenes)} scenes; vae {count(vae)/1e6:.2f}M, unet {count(unet)/1e6:.2f}M, text {count(text_encoder)/1e6:.2f}M parameters, "
        f"device {device}, load {cpu_load()}")

    earlier = {k: float((previous or {}).get("times", {}).get(k) or 0.0) for k in ("cpu_s", "total_s")}

    def stamp() -> None:
        """Every leg's wall-clock and CPU time so far (this process's CPU time: what the run costs whatever else runs)."""
        record["times"]["total_s"] = earlier["total_s"] + time.perf_counter() - t0
        record["times"]["cpu_s"] = earlier["cpu_s"] + time.process_time() - cpu0

    with Budget(cfg) as budget:
        return train_stages(cfg, record, previous, in_vae, budget, tokenizer, vae, unet, text_encoder, scheduler, scenes, images, vae_images,
                            train_vae_now, device, log, stamp, cpu0, prior_times if previous and not in_vae else {})


def train_stages(cfg, record, previous, in_vae, budget, tokenizer, vae, unet, text_encoder, scheduler, scenes, images, vae_images, train_vae_now,
                 device, log, stamp, cpu0, prior_times) -> dict:
    out = Path(cfg.out)
    if train_vae_now:
        start = previous["vae_steps_done"] if in_vae else 0
        if not train_vae(vae, vae_images, cfg, device, log, budget, record, start, stamp):
            record["stopped"] = budget.reason()
            return record
        if vae_state_dir(out).exists():
            shutil.rmtree(vae_state_dir(out))
        previous = None  # the UNet stage starts afresh
    latents = encode_all(vae, images, device)
    scale = float(1.0 / latents.std()) if not previous else float(vae.config.scaling_factor)
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    if not previous:
        stamp()
        record["times"]["draw_and_vae_cpu_s"] = record["times"]["cpu_s"]
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
    start = previous["unet_steps_done"] if previous else 0
    lr_at = lambda s: min(1.0, s / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.unet_steps) / cfg.unet_steps))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s + start))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    alphas = scheduler.alphas_cumprod
    running, step = (previous.get("final_loss") if previous else None), start
    if previous:
        if load_state(out, start, params, ema, opt, gen, rng):
            record["legs"][-1]["resumed_exactly"] = True
            log(f"resuming at UNet step {start} from {state_dir(out)}: weights, EMA, AdamW moments and random generators as saved")
        else:
            # no exact state (a run saved before it was kept): the saved EMA weights become the live ones, AdamW's
            # moments start again, and the data stream is replayed so every later step draws what it would have drawn
            for _ in range(start):
                idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=gen)
                for i in idx.tolist():
                    world.training_caption(rng, scenes[i], cfg.caption_drop)
                torch.randn(latents[idx].shape, generator=gen)
                torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
            record["legs"][-1]["resumed_exactly"] = False
            log(f"resuming at UNet step {start} from the saved (EMA) weights: no exact state at {state_dir(out)}, so AdamW's moments restart")
    # the earlier legs' times (cumulative): this leg's are added to them
    prior = {"unet_s": float(prior_times.get("unet_s") or 0.0) if previous else 0.0}
    t_unet, cpu_unet = time.perf_counter(), time.process_time()

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

    for step in range(start + 1, cfg.unet_steps + 1):
        idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=gen)
        x0 = latents[idx].to(device)
        ids = torch.stack([ids_for(world.training_caption(rng, scenes[i], cfg.caption_drop)) for i in idx.tolist()]).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        a = alphas[timesteps].to(device).view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if cfg.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(noisy, timesteps.to(device), encoder_hidden_states=text_encoder(ids)[0]).sample
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weights(alphas, timesteps, cfg.snr_gamma).to(device)).mean()
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
        budget.step()
        if step % 25 == 0:
            record["unet_history"].append({"step": step, "loss": running, "lr": lr_sched.get_last_lr()[0], "load": cpu_load()})
            done = step - start
            log(f"unet step {step}/{cfg.unet_steps} loss {running:.4f} ({(time.perf_counter() - t_unet) / done:.2f}s/step, "
                f"{(time.process_time() - cpu_unet) / done:.2f}s CPU, load {cpu_load()})")
        stop = budget.reason() if step < cfg.unet_steps else None
        if step % cfg.save_every == 0 or step == cfg.unet_steps or stop:
            record["times"]["unet_s"] = prior["unet_s"] + time.perf_counter() - t_unet
            stamp()
            record["unet_steps_done"] = step
            record["final_loss"] = running
            loads = [h["load"] for h in record["vae_history"] + record["unet_history"] if h.get("load") is not None]
            if loads:
                record["load_average"] = {"mean": round(float(np.mean(loads)), 2), "min": min(loads), "max": max(loads)}
            save_ema()
            io.write_json(out / "training.json", record)
            if step < cfg.unet_steps:
                save_state(out, step, params, ema, opt, gen, rng)
            elif state_dir(out).exists():
                shutil.rmtree(state_dir(out))
            log(f"saved {out} at step {step}")
        if stop:
            log(f"stopping at UNet step {step}: {stop}; run the same command with --resume to continue")
            record["stopped"] = stop
            break
    return record


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).split(",") if v.strip())


DEFAULTS = TrainConfig()


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULTS.out, show_default=True, help="Where the diffusers pipeline and training.json go.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--num-scenes", type=int, default=DEFAULTS.num_scenes, show_default=True, help="Captioned scenes drawn once and cached (images and latents).")
@click.option("--vae-channels", default=",".join(map(str, DEFAULTS.vae_channels)), show_default=True, help="VAE widths per level; n levels reduce 2**(n-1) times.")
@click.option("--latent-channels", type=int, default=DEFAULTS.latent_channels, show_default=True)
@click.option("--vae-scenes", type=int, default=DEFAULTS.vae_scenes, show_default=True, help="Whole-world scenes the VAE trains on.")
@click.option("--vae-steps", type=int, default=DEFAULTS.vae_steps, show_default=True)
@click.option("--vae-from", default=DEFAULTS.vae_from, help="Reuse the VAE of this pipeline folder instead of training one.")
@click.option("--unet-channels", default=",".join(map(str, DEFAULTS.unet_channels)), show_default=True, help="UNet widths per level.")
@click.option("--unet-heads", default=",".join(map(str, DEFAULTS.unet_heads)), show_default=True, help="Attention head dimension per UNet level.")
@click.option("--unet-layers", type=int, default=DEFAULTS.unet_layers, show_default=True, help="ResNet + attention layers per UNet level.")
@click.option("--text-layers", type=int, default=DEFAULTS.text_layers, show_default=True)
@click.option("--unet-steps", type=int, default=DEFAULTS.unet_steps, show_default=True)
@click.option("--unet-batch", type=int, default=DEFAULTS.unet_batch, show_default=True)
@click.option("--unet-lr", type=float, default=DEFAULTS.unet_lr, show_default=True)
@click.option("--ema-decay", type=float, default=DEFAULTS.ema_decay, show_default=True)
@click.option("--prediction", type=click.Choice(["v_prediction", "epsilon"]), default=DEFAULTS.prediction, show_default=True)
@click.option("--zero-snr/--no-zero-snr", default=DEFAULTS.zero_snr, show_default=True, help="Rescale the noise schedule to end at pure noise.")
@click.option("--snr-gamma", type=float, default=DEFAULTS.snr_gamma, show_default=True, help="Min-SNR loss weighting (0: plain MSE).")
@click.option("--minutes", type=float, default=DEFAULTS.minutes, show_default=True,
              help="Stop after this many minutes of this leg, VAE and UNet stages together, saving the exact state for --resume (0: run every step).")
@click.option("--stop-after", type=int, default=DEFAULTS.stop_after, show_default=True,
              help="Stop after this many steps of this leg (VAE and UNet steps counted together), saving the exact state for --resume (0: no limit).")
@click.option("--save-every", type=int, default=DEFAULTS.save_every, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (a GPU where there is one), cpu, cuda.")
@click.option("--threads", type=int, default=DEFAULTS.threads, show_default=True, help="CPU threads for torch.")
@click.option("--resume", is_flag=True, help="Continue the run at --out from its last save, in the VAE or the UNet stage (same options; the exact "
              "state is kept beside it). SIGTERM or Ctrl-C saves it at the next step and stops.")
def main(**values):
    """Train bas-mini on the procedural world and write it as a diffusers pipeline."""
    for name in ("vae_channels", "unet_channels", "unet_heads"):
        values[name] = _ints(values[name])
    if len(values["unet_heads"]) != len(values["unet_channels"]):
        raise click.BadParameter("give one head dimension per UNet level", param_hint="--unet-heads")
    from bas.core import io
    from bas.core.errors import BasError

    try:  # a file there, or above it: one line now, not mkdir's traceback after the world is drawn
        io.check_output_folder(Path(values["out"]), "--out")
    except BasError as exc:
        raise click.ClickException(str(exc)) from None
    record = train(TrainConfig(**values))
    t = record["times"]
    if record.get("stopped") and record.get("unet_steps_done") is None:
        click.echo(f"Stopped in the VAE stage ({record['stopped']}) after {t['cpu_s'] / 60:.1f} min of CPU time; run the same command with --resume "
                   f"to continue.")
        return
    click.echo(f"Trained {record['unet_steps_done']} UNet steps in {t['total_s'] / 60:.1f} min ({t['cpu_s'] / 60:.1f} min of CPU time); "
               f"final loss {record['final_loss']:.4f}.")


if __name__ == "__main__":
    main()
