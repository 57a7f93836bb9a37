"""LoRA adapters on the denoiser's attention and every text encoder (peft): phase 2's default weights.

Which modules get adapters is the model family's ``lora_targets`` (for SD and SDXL: the UNet's
``to_q/to_k/to_v/to_out.0`` and each CLIP encoder's ``q/k/v/out_proj``).  The result is a few MB
in ``lora/pytorch_lora_weights.safetensors``, loadable with diffusers'
``pipe.load_lora_weights(OUT / "lora")``, instead of a multi-GB pipeline copy.
"""

from __future__ import annotations

from pathlib import Path

import click

from bas import hookimpl
from bas.core import checks
from bas.core.components import WeightStrategy


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

    def adapted(self, run) -> dict:
        """``{component: module}`` that get adapters: the denoiser, and the text encoders unless turned off."""
        modules = run.components.trainable_modules()
        denoiser = run.components.denoiser_name
        return {name: modules[name] for name in run.family.lora_targets if name == denoiser or self.text_encoder}

    def prepare(self, run):
        from peft import inject_adapter_in_model

        denoiser = run.components.denoiser_name
        self.configs = {}
        params = []
        for name, module in self.adapted(run).items():
            self.configs[name] = self._config(run.family.lora_target(name, module))
            if name == denoiser:
                module.add_adapter(self.configs[name])  # diffusers' models know their adapters
            else:
                inject_adapter_in_model(self.configs[name], module)
            params += [p for n, p in module.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
            p.data = p.data.to(run.device)
        return params

    def save(self, run, out: Path) -> list[str]:
        """``lora/pytorch_lora_weights.safetensors`` in the layout every diffusers version and ComfyUI read
        (``bas.exports.formats``): this LoRA's scale ``alpha / rank`` is folded into the up factors."""
        from peft.utils import get_peft_model_state_dict

        from bas.exports.formats import peft_layers, write_diffusers_lora

        layers = [layer for name, module in self.adapted(run).items() for layer in peft_layers(name, get_peft_model_state_dict(module), self.alpha)]
        write_diffusers_lora(layers, out / "lora")
        return ["lora/pytorch_lora_weights.safetensors"]

    def load_pipeline(self, out: Path, run_info: dict, load):
        from bas.core.compat import LORA_WEIGHT_NAME, load_lora_folder
        from bas.core.runs import damaged_weights, weight_names

        path = out / "lora" / LORA_WEIGHT_NAME
        if not any("lora" in name for name in weight_names(path)):  # a damaged file is one line (bas.core.runs), before any model loads
            raise damaged_weights(path, "holds no LoRA weights")
        pipe = load(run_info["model"])
        load_lora_folder(pipe, out / "lora")
        return pipe


@hookimpl
def bas_run_options():
    return [
        click.Option(["--lora-rank"], type=int, default=8, show_default=True, help="LoRA rank."),
        click.Option(["--lora-alpha"], type=float, default=None, help="LoRA alpha [default: the rank]."),
        click.Option(["--lora-text-encoder/--no-lora-text-encoder"], default=True, show_default=True, help="Also train LoRA on the text encoder(s)."),
    ]


@hookimpl
def bas_register_weight_strategies(register):
    register("lora", Lora, description="LoRA on the denoiser's attention + the text encoder(s) (peft); a few MB per scene")
