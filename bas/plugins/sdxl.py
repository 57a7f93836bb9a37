"""Stable Diffusion XL: two CLIP text encoders, size micro-conditioning, native 1024 px.

A prompt becomes both encoders' penultimate hidden states concatenated (768 + 1280 = 2048 wide
for SDXL base), the pooled and projected output of encoder 2, and ``add_time_ids`` from the
image's original size, crop corner and target size, as diffusers' ``StableDiffusionXLPipeline``
makes them.  Every handle has a row in both encoders.  The attention loss reads the UNet's
cross-attention layers of the down and up blocks at a quarter of the latent side (32x32 at
1024 px).

SDXL's second text encoder ships with the pre-2023 CLIP config (``eos_token_id: 2``), which makes
transformers pool the hidden state of the token with the highest id: once handles are added that
is a handle, not the end of the prompt.  This family points the pooling back at the end-of-text
token wherever it loads an encoder (training and generation), as AUTOMATIC1111 and ComfyUI pool,
and a full fine-tune's saved pipeline keeps the corrected config.
"""

from __future__ import annotations

import torch

from bas import hookimpl
from bas.core.family import Conditioning, TextEncoder, UNetFamily, python_str
from bas.plugins.sd import CLIP_ATTENTION, UNET_ATTENTION


def pool_at_end_of_text(encoder: TextEncoder) -> None:
    """Make a CLIP text model pool the end-of-text token, not the highest token id (see the module docstring)."""
    text_model = getattr(encoder.model, "text_model", encoder.model)
    eos = encoder.tokenizer.eos_token_id
    if getattr(text_model, "eos_token_id", None) == 2 and eos != 2:
        text_model.eos_token_id = eos
        encoder.model.config.eos_token_id = eos


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    description = "Stable Diffusion XL: two CLIP text encoders (penultimate states + pooled), size conditioning, 1024 px"
    default_model = "stabilityai/stable-diffusion-xl-base-1.0"
    pipeline_class = "StableDiffusionXLPipeline"
    recognised_pipelines = ("StableDiffusionXLPipeline",)
    text_encoder_names = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    component_classes = {
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "vae": ("diffusers", "AutoencoderKL"),
        "unet": ("diffusers", "UNet2DConditionModel"),
    }
    pipeline_kwargs = {"add_watermarker": False}
    lora_targets = {"unet": UNET_ATTENTION, "text_encoder": CLIP_ATTENTION, "text_encoder_2": CLIP_ATTENTION}
    # kohya's sd-scripts, AUTOMATIC1111's networks.py and ComfyUI's lora.py name SDXL's encoders te1/te2
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

    def lora_target(self, component, module):
        """Text encoder 1's last layer only feeds its last hidden state and pooled output, which SDXL
        never reads (it takes the penultimate states, and the pooled output of encoder 2): no LoRA there."""
        if component != "text_encoder":
            return super().lora_target(component, module)
        read = range(module.config.num_hidden_layers - 1)
        return rf".*encoder\.layers\.({'|'.join(map(str, read))})\.self_attn\.({'|'.join(CLIP_ATTENTION)})"

    def kohya_base(self, info):
        """As kohya's sd-scripts write SDXL base LoRA (``sdxl_base_v1-0``, ``stable-diffusion-xl-v1-base/lora``)."""
        return {"version": "sdxl_base_v1-0", "v2": False, "architecture": "stable-diffusion-xl-v1-base/lora", "resolution": 1024, "label": "SDXL"}

    def load(self, model, plan=None):
        components = super().load(model, plan)
        for encoder in components.text_encoders:
            pool_at_end_of_text(encoder)
        return components

    def load_pipeline(self, model, device, dtype, quantize="none"):
        pipe = super().load_pipeline(model, device, dtype, quantize)
        for encoder in self.pipeline_text_encoders(pipe):
            pool_at_end_of_text(encoder)
        return pipe

    def memory_defaults(self, device, strategy):
        """On a GPU: gradient checkpointing (SDXL's UNet activations at 1024 px dominate memory), and
        8-bit AdamW for a full fine-tune (its optimizer state is 2 x 3.5 B values; LoRA's is small)."""
        if device.type != "cuda":
            return {}
        return {"gradient_checkpointing": True, **({"optimizer": "adamw8bit"} if strategy == "full" else {})}

    def conditioning(self, components, input_ids, size):
        states = []
        for encoder, ids in zip(components.text_encoders, input_ids):
            out = encoder.model(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
        pooled = out[0]  # encoder 2's projected pooled output, "text_embeds"
        time_ids = torch.tensor([size.original + size.crop_top_left + size.target], dtype=torch.float32, device=pooled.device)
        return Conditioning(torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)})

    def unconditional(self, components, encode):
        """Zeros, as SDXL's pipeline makes an empty negative prompt (``force_zeros_for_empty_prompt``)."""
        cond = encode([""])
        return Conditioning(torch.zeros_like(cond.hidden_states),
                            {"text_embeds": torch.zeros_like(cond.extra["text_embeds"]), "time_ids": cond.extra["time_ids"]})

    def added_cond_kwargs(self, cond):
        return {"text_embeds": cond.extra["text_embeds"], "time_ids": cond.extra["time_ids"]}

    def prompt_conditioning(self, pipe, prompt, negative_prompt, guided, lora_scale, size):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt, lora_scale=lora_scale,
        )
        time_ids = pipe._get_add_time_ids(size.original, size.crop_top_left, size.target, dtype=cond.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim).to(pipe.device)
        return (Conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids}),
                Conditioning(uncond, {"text_embeds": uncond_pooled, "time_ids": time_ids}) if guided else None)

    def textual_inversion(self, token, rows):
        """One file per handle with both encoders' rows, as AUTOMATIC1111, ComfyUI and diffusers' SDXL
        examples keep SDXL embeddings: ``{"clip_l": tensor[1, 768], "clip_g": tensor[1, 1280]}``."""
        return {"clip_l": rows["text_encoder"].float()[None], "clip_g": rows["text_encoder_2"].float()[None]}

    def webui_embedding(self, rows):
        return self.textual_inversion("", rows)

    def textual_inversion_code(self, files):
        pairs = ", ".join(f"({python_str(token)}, {python_str(path)})" for token, path in files)
        return [
            "from safetensors.torch import load_file",
            f"for token, path in [{pairs}]:",
            "    state = load_file(path)  # one row per text encoder",
            '    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)',
            '    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)',
            "pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id  # pool the prompt's end, as bas trained",
        ]

    def tiny_pipeline(self, seed=0, prediction_type="epsilon", sample_size=16):
        return build_tiny_sdxl_pipeline(seed=seed, prediction_type=prediction_type, sample_size=sample_size)


def build_tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16):
    """A tiny random SDXL pipeline: SDXL's structure (a 3-level UNet without attention at the top
    level and deeper transformers at the bottom, text-time conditioning, two CLIP text models of
    different widths, the second with a projection and SDXL's legacy pooling config, an 8x VAE,
    Euler with "leading" spacing) at a size that trains in milliseconds per step on a CPU."""
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from bas.demo.tiny import write_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        files = (str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
        tokenizer = CLIPTokenizer(*files, model_max_length=77)
        tokenizer_2 = CLIPTokenizer(*files, model_max_length=77, pad_token="!")  # as SDXL's second tokenizer
    widths, projection, time_dim = (32, 48), 24, 8

    def clip_config(hidden, **extra):
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu", **extra,
        )

    text_encoder = CLIPTextModel(clip_config(widths[0], eos_token_id=tokenizer.eos_token_id))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(widths[1], eos_token_id=2, projection_dim=projection))
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=sum(widths),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        sample_size=sample_size * 8, scaling_factor=0.13025, force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


@hookimpl
def bas_register_model_families(register):
    register("sdxl", StableDiffusionXL, description=StableDiffusionXL.description)
