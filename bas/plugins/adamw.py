"""AdamW optimizers: torch's (fused on CUDA) and bitsandbytes' 8-bit AdamW (--optimizer adamw8bit)."""

from __future__ import annotations

import click
import torch

from bas import hookimpl
from bas.core.errors import BasError


def _kwargs(config) -> dict:
    o = config.options
    return {
        "betas": (o.get("adam_beta1", 0.9), o.get("adam_beta2", 0.99)),
        "weight_decay": o.get("adam_weight_decay", 1e-8),
        "eps": o.get("adam_epsilon", 1e-8),
    }


def adamw(param_groups, config):
    on_cuda = all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, fused=on_cuda or None, **_kwargs(config))


def _bitsandbytes():
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # bitsandbytes raises various errors when its CUDA library is missing
        raise BasError(f"bitsandbytes could not be loaded ({exc}); reinstall it with `pip install bitsandbytes` or use --optimizer adamw.") from exc
    return bnb


def adamw8bit(param_groups, config):
    if not all(p.is_cuda for g in param_groups for p in g["params"]):
        raise BasError("--optimizer adamw8bit needs a CUDA GPU; use --optimizer adamw on the CPU.")
    return _bitsandbytes().optim.AdamW8bit(param_groups, **_kwargs(config))


def check_adamw8bit(config, device) -> None:
    """Before any model loads: bitsandbytes' 8-bit AdamW runs on CUDA only, and must import."""
    if device.type != "cuda":
        raise BasError(f"--optimizer adamw8bit needs a CUDA GPU; use --optimizer adamw on the {device.type.upper()}.")
    _bitsandbytes()


adamw8bit.check = check_adamw8bit  # the run calls an optimizer factory's check(config, device) before loading


@hookimpl
def bas_run_options():
    return [
        click.Option(["--adam-beta1"], type=float, default=0.9, show_default=True, help="AdamW beta1."),
        click.Option(["--adam-beta2"], type=float, default=0.99, show_default=True, help="AdamW beta2 (the paper's 0.99)."),
        click.Option(["--adam-weight-decay"], type=float, default=1e-8, show_default=True, help="AdamW weight decay (the paper's 1e-8)."),
        click.Option(["--adam-epsilon"], type=float, default=1e-8, show_default=True, help="AdamW epsilon."),
    ]


@hookimpl
def bas_register_optimizers(register):
    register("adamw", adamw, description="torch AdamW (fused kernels on CUDA)")
    register("adamw8bit", adamw8bit, description="bitsandbytes 8-bit AdamW, CUDA only; saves optimizer memory")
