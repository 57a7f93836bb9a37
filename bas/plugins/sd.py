"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, epsilon or v-prediction (the paper's family).

A prompt becomes the text encoder's last hidden state; the attention loss reads the UNet's
cross-attention layers of the down and up blocks (16x16 at 512 px).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bas import hookimpl
from bas.core.family import Conditioning, UNetFamily
from bas.demo.tiny import write_tokenizer

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
        from bas.exports.formats import base_model_version, modelspec_architecture

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

    def tiny_pipeline(self, seed=0, prediction_type="epsilon", sample_size=16):
        return build_tiny_sd_pipeline(seed=seed, prediction_type=prediction_type, sample_size=sample_size)


def build_tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16):
    """A tiny random Stable Diffusion pipeline in memory: SD 2.x's structure (4 UNet levels with
    cross-attention on the first three, linear projections, an 8x VAE, a CLIP text model, a CLIP BPE
    tokenizer); ``sample_size`` is the latent side (x8 for pixels)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 8, 8),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size * 8,
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=32,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@hookimpl
def bas_register_model_families(register):
    register("sd", StableDiffusion, description=StableDiffusion.description)
