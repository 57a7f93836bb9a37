"""Loading a Stable Diffusion 1.x/2.x model in diffusers format, from the hub or a local folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bas.core.errors import BasError

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor


def resolve_model(model: str | Path) -> str:
    """``bas-mini`` names the model shipped with bas; anything else is a hub id or a folder."""
    from bas import mini

    return str(mini.model_path()) if str(model) == mini.NAME else str(model)


def _check_model_path(model: str) -> None:
    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise BasError(f"{model} is not a diffusers pipeline folder (it has no model_index.json); pass a Stable Diffusion folder or hub id with --model.")


def _load_error(model: str, exc: Exception) -> BasError:
    return BasError(
        f"Could not load model '{model}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
        "check the hub id and your connection (or `hf auth login`), or pass a local diffusers folder with --model."
    )


def load_components(model: str) -> Components:
    """The five parts training needs, each through ``from_pretrained`` (hub id or local folder)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = resolve_model(model)
    _check_model_path(model)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _load_error(model, exc) from exc
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise BasError(f"Model '{model}' predicts '{noise_scheduler.config.prediction_type}'; bas supports epsilon and v-prediction models (Stable Diffusion 1.x/2.x).")
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler)


def load_pipeline(model: str | Path, device: torch.device, dtype: torch.dtype):
    """A ``StableDiffusionPipeline`` for generation, without the safety checker."""
    from diffusers import StableDiffusionPipeline

    model = resolve_model(model)
    _check_model_path(model)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _load_error(model, exc) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against what this machine has."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise BasError(f"Unknown --device {device!r}; use auto, cpu, cuda, cuda:N or mps.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BasError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BasError(f"--device {device} names GPU {dev.index} but this machine has {torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BasError("--device mps was asked for but this machine has no Apple GPU; use --device cpu.")
    return dev


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` picks bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise BasError(f"Unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise BasError("fp16 needs a CUDA GPU; use --precision bf16 or fp32 on the CPU.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BasError("This GPU does not support bf16; use --precision fp16.")
    return precision


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
