"""LoRA adapters on the UNet's attention and the text encoder (peft): phase 2's default weights.

The result is a few MB in ``lora/pytorch_lora_weights.safetensors``, loadable with diffusers'
``pipe.load_lora_weights(OUT / "lora")``, instead of a multi-GB pipeline copy.
"""

from __future__ import annotations

from pathlib import Path

import click

from bas import hookimpl
from bas.core import checks, io
from bas.core.components import WeightStrategy

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class Lora(WeightStrategy):
    name = "lora"
    default_lr = 1e-4
    freezes_base = True

    def __init__(self, config):
        o = config.options
        self.rank = o.get("lora_rank", 8)
        checks.check_integer("lora_rank", self.rank, 1)
        if o.get("lora_alpha") is not None:
            checks.check_positive("lora_alpha", o["lora_alpha"])
        self.alpha = o.get("lora_alpha") or self.rank
        self.text_encoder = o.get("lora_text_encoder", True)

    def _config(self, targets):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian", target_modules=targets)

    def prepare(self, run):
        from peft import inject_adapter_in_model

        c = run.components
        self.unet_config = self._config(UNET_TARGETS)
        c.unet.add_adapter(self.unet_config)
        modules = [c.unet]
        if self.text_encoder:
            self.text_config = self._config(TEXT_TARGETS)
            inject_adapter_in_model(self.text_config, c.text_encoder)
            modules.append(c.text_encoder)
        params = []
        for module in modules:
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
                    params.append(p)
        for p in params:
            p.data = p.data.to(run.device)
        return params

    def save(self, run, out: Path) -> list[str]:
        """``lora/pytorch_lora_weights.safetensors`` in the layout every diffusers version and ComfyUI read
        (``bas.core.formats``): this LoRA's scale ``alpha / rank`` is folded into the up factors."""
        from peft.utils import get_peft_model_state_dict

        from bas.core.formats import peft_layers, write_diffusers_lora

        c = run.components
        layers = peft_layers("unet", get_peft_model_state_dict(c.unet), self.alpha)
        if self.text_encoder:
            layers += peft_layers("text_encoder", get_peft_model_state_dict(c.text_encoder), self.alpha)
        write_diffusers_lora(layers, out / "lora")
        return ["lora/pytorch_lora_weights.safetensors"]

    def load_pipeline(self, out: Path, run_info: dict, load):
        pipe = load(run_info["model"])
        pipe.load_lora_weights(str(out / "lora"))
        return pipe


@hookimpl
def bas_run_options():
    return [
        click.Option(["--lora-rank"], type=int, default=8, show_default=True, help="LoRA rank."),
        click.Option(["--lora-alpha"], type=float, default=None, help="LoRA alpha [default: the rank]."),
        click.Option(["--lora-text-encoder/--no-lora-text-encoder"], default=True, show_default=True, help="Also train LoRA on the text encoder."),
    ]


@hookimpl
def bas_register_weight_strategies(register):
    register("lora", Lora, description="LoRA on UNet attention + text encoder (peft); a few MB per scene")
