"""Models: names, devices and precisions, and loading a pipeline's parts through its model family."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bas.core.errors import BasError
from bas.core.family import Components, ModelFamily, choose_family


def resolve_model(model: str | Path, plugins=None) -> str:
    """The folder a plugin gives the model name (``bas_model_path``: ``bas-mini`` is the model shipped with
    bas); any other name is a hub id or a folder."""
    from bas.core.plugins import Plugins

    return (plugins or Plugins()).model_path(str(model)) or str(model)


def family_of(model: str, family: ModelFamily | str | None = None, plugins=None) -> ModelFamily:
    """``family`` (an object, or a name looked up among the plugins' families), else the family of ``model``."""
    if isinstance(family, ModelFamily):
        return family
    from bas.core.plugins import Plugins

    plugins = plugins or Plugins()
    return choose_family(plugins, resolve_model(model, plugins), family)


def load_components(model: str, family: ModelFamily | str | None = None) -> Components:
    """The parts training needs, each through ``from_pretrained`` (hub id or local folder)."""
    return family_of(model, family).load(resolve_model(model))


def default_model() -> str:
    """The model ``bas run`` uses without --model and --family: the default family's (the paper's SD 2.1 base)."""
    from bas.core.family import default_family
    from bas.core.plugins import Plugins

    return default_family(Plugins()).default_model


def load_pipeline(model: str | Path, device: torch.device, dtype: torch.dtype, family: ModelFamily | str | None = None,
                  quantize: str = "none"):
    """The family's diffusers pipeline for generation (for SD without the safety checker); ``quantize``
    the run's ``--quantize``, used on CUDA only."""
    quantize = quantize if device.type == "cuda" else "none"
    chosen = family_of(str(model), family)
    if quantize != "none":
        chosen.check_quantization(quantize, device)  # before the pipeline loads
    return chosen.load_pipeline(resolve_model(model), device, dtype, quantize)


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


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a module, casting only when its dtype differs (diffusers warns on every cast).  A quantised
    model (bitsandbytes) is left as it was loaded: onto its device, in its own dtypes."""
    if getattr(module, "is_quantized", False):
        return module
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module.to(device)
