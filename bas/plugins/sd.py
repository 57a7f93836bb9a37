"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, epsilon or v-prediction (the paper's family).

A prompt becomes the text encoder's last hidden state; the attention loss reads the UNet's
cross-attention layers of the down and up blocks (16x16 at 512 px).
"""

from __future__ import annotations

from bas import hookimpl
from bas.core.family import Conditioning, UNetFamily

CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]


class StableDiffusion(UNetFamily):
    name = "sd"
    description = "Stable Diffusion 1.x/2.x: one CLIP text encoder, UNet, epsilon or v-prediction"
    default_model = "stabilityai/stable-diffusion-2-1-base"
    default = True
    pipeline_class = "StableDiffusionPipeline"
    recognised_pipelines = ("StableDiffusionPipeline",)
    component_classes = {
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "unet": ("diffusers", "UNet2DConditionModel"),
    }
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    lora_targets = {"unet": UNET_ATTENTION, "text_encoder": CLIP_ATTENTION}
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}

    def kohya_base(self, info):
        """SD 2.x by its OpenCLIP ViT-H encoder (1024 wide), v-prediction as kohya records it."""
        from bas.core.formats import base_model_version, modelspec_architecture

        v2 = info.get("handle_dim") == 1024
        v_prediction = info.get("prediction_type") == "v_prediction"
        label = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(info.get("handle_dim"), "")
        return {"version": base_model_version(v2, v_prediction), "v2": v2, "architecture": modelspec_architecture(v2, v_prediction),
                "resolution": 768 if v2 and v_prediction else 512, "label": label}

    def conditioning(self, components, input_ids, size):
        return Conditioning(components.text_encoders[0].model(input_ids[0])[0])

    def prompt_conditioning(self, pipe, prompt, negative_prompt, guided, lora_scale, size):
        cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, guided, negative_prompt, lora_scale=lora_scale)
        return Conditioning(cond), (Conditioning(uncond) if guided else None)

    def tiny_pipeline(self, seed=0, prediction_type="epsilon"):
        from bas.core.tiny import build_tiny_pipeline

        return build_tiny_pipeline(seed=seed, prediction_type=prediction_type)


@hookimpl
def bas_register_model_families(register):
    register("sd", StableDiffusion, description=StableDiffusion.description)
