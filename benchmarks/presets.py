"""Architecture presets: Stable Diffusion pipelines with the real shapes and random weights.

Speed and memory depend on shapes, not on the weights' values, so the SD 1.5, SD 2.1 and SDXL
presets build those architectures in code (nothing is downloaded) and save them once, in
diffusers format, to a cache folder that ``bas`` then loads like any other local model.  ``tiny``
is the test model of :mod:`bas.demo.tiny`; ``small`` sits between it and SD 1.5: SD's layout (4
UNet levels, 2 layers per level, linear projections, the 8x VAE, CLIP's 49408-token vocabulary) at
a width and resolution that run a few training steps per second on a CPU.  ``sdxl-small`` is
SDXL's layout (3 UNet levels with 1/2/10-deep transformers, text-time conditioning, two CLIP text
models of 12 and 32 layers) at a tenth of its widths, for the CPU.  ``flux`` is FLUX.1-dev (a 3072-wide
transformer of 19 double- and 38 single-stream blocks with a guidance embedding, T5-XXL, CLIP-L, the
16-channel VAE) saved in bf16, for a GPU (its fp32 build needs ~70 GB of RAM); ``flux-small`` keeps
every block and layer at a twenty-fourth of the transformer's width and a sixteenth of T5's, at
256 px, for the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

CLIP_VOCAB_SIZE = 49408  # every SD 1.x/2.x tokenizer

SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)


FLUX_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
)
T5_ROWS = 32128  # T5's embedding rows (its tokenizer has 32100 tokens)


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int  # training resolution in pixels
    description: str
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)  # CLIPTextConfig fields; vocab_size is set from the tokenizer
    text_2: dict = field(default_factory=dict)  # SDXL's second text model (with a projection); empty: an SD pipeline
    transformer: dict = field(default_factory=dict)  # FluxTransformer2DModel fields; set: a FLUX pipeline
    t5: dict = field(default_factory=dict)  # T5Config fields of FLUX's second text encoder

    def key(self) -> str:
        """Changes when the architecture or the saved layout (``SAVED_LAYOUT``) does, so a cached model is rebuilt."""
        fields = {**asdict(self), "saved_layout": SAVED_LAYOUT}
        return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]


# 2: saved by formats.save_pipeline (transformers 4.x's names and tokenizer files), not save_pretrained alone
SAVED_LAYOUT = 2

PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 128, "bas.demo.tiny: the test model (UNet 16/32/32/32, 2-layer 32-d text model)"),
    "small": Preset(
        "small", 256, "SD layout at 1/10 width: UNet 32/64/128/128, 2 layers per level, 256-d 4-layer text model, 256 px",
        unet=dict(
            sample_size=32, block_out_channels=(32, 64, 128, 128), layers_per_block=2, down_block_types=SD_DOWN,
            up_block_types=SD_UP, cross_attention_dim=256, attention_head_dim=(1, 2, 4, 4), use_linear_projection=True,
            norm_num_groups=16,
        ),
        vae=dict(SD_VAE, block_out_channels=(16, 32, 64, 64), norm_num_groups=8, sample_size=256),
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256, hidden_act="gelu"),
    ),
    "sd15": Preset(
        "sd15", 512, "Stable Diffusion 1.5: UNet 320/640/1280/1280, 8 heads, CLIP ViT-L/14 text model (768-d, 12 layers)",
        unet=dict(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, down_block_types=SD_DOWN,
            up_block_types=SD_UP, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
            norm_num_groups=32,
        ),
        vae=SD_VAE,
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"),
    ),
    "sd21": Preset(
        "sd21", 512, "Stable Diffusion 2.1 base: UNet 320/640/1280/1280, heads 5/10/20/20, linear projections, OpenCLIP ViT-H text tower (1024-d, 23 layers)",
        unet=dict(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, down_block_types=SD_DOWN,
            up_block_types=SD_UP, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            norm_num_groups=32,
        ),
        vae=SD_VAE,
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, projection_dim=512, hidden_act="gelu"),
    ),
    "sdxl": Preset(
        "sdxl", 1024, "SDXL base: UNet 320/640/1280 with 1/2/10-deep transformers, heads 5/10/20, text-time conditioning; CLIP ViT-L (768-d, 12 layers) + OpenCLIP bigG (1280-d, 32 layers)",
        unet=dict(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, down_block_types=SDXL_DOWN, up_block_types=SDXL_UP,
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        ),
        vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu"),
    ),
    "sdxl-small": Preset(
        "sdxl-small", 256, "SDXL layout at 1/10 width: UNet 32/64/128 with 1/2/10-deep transformers; 64-d 12-layer and 128-d 32-layer text models, 256 px",
        unet=dict(
            sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=2, down_block_types=SDXL_DOWN, up_block_types=SDXL_UP,
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=192, attention_head_dim=(1, 2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=32, projection_class_embeddings_input_dim=6 * 32 + 128, norm_num_groups=16,
        ),
        vae=dict(SD_VAE, block_out_channels=(16, 32, 64, 64), norm_num_groups=8, sample_size=256, scaling_factor=0.13025),
        text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4, projection_dim=64, hidden_act="quick_gelu"),
        text_2=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=32, num_attention_heads=4, projection_dim=128, hidden_act="gelu"),
    ),
    "flux": Preset(
        "flux", 512, "FLUX.1-dev: transformer 3072-d (24 heads of 128), 19 double + 38 single blocks, guidance embedding; "
        "T5-XXL (4096-d, 24 layers, 32128 rows) + CLIP-L (768-d, 12 layers); 16-channel VAE; bf16 weights, 512 px",
        transformer=dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56), in_channels=64),
        vae=FLUX_VAE,
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"),
        t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    ),
    "flux-small": Preset(
        "flux-small", 256, "FLUX.1 layout at reduced width: transformer 128-d (2 heads of 64), 19 double + 38 single blocks; "
        "T5 256-d 24 layers (32128 rows), CLIP 192-d 12 layers; 16-channel VAE 16/32/64/64; 256 px",
        transformer=dict(num_layers=19, num_single_layers=38, attention_head_dim=64, num_attention_heads=2, joint_attention_dim=256,
                         pooled_projection_dim=192, guidance_embeds=True, axes_dims_rope=(16, 24, 24), in_channels=64),
        vae=dict(FLUX_VAE, block_out_channels=(16, 32, 64, 64), norm_num_groups=8, sample_size=256),
        text=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=12, num_attention_heads=4, projection_dim=192, hidden_act="quick_gelu"),
        t5=dict(d_model=256, d_kv=64, d_ff=640, num_layers=24, num_heads=4),
    ),
}


def write_clip_sized_tokenizer(directory: Path) -> None:
    """The tiny BPE tokenizer, padded with unreachable tokens to CLIP's 49408 entries, special tokens last as in CLIP."""
    from bas.demo.tiny import write_tokenizer

    write_tokenizer(directory)
    vocab = json.loads((directory / "vocab.json").read_text())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = [t for t in sorted(vocab, key=vocab.get) if t not in specials]
    tokens += [f"<|unused{i}|>" for i in range(CLIP_VOCAB_SIZE - len(tokens) - len(specials))]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens + specials)}, ensure_ascii=False))


def build_pipeline(preset: Preset, seed: int = 0):
    """The preset's pipeline in memory, with random weights."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if preset.name == "tiny":
        from bas.demo.tiny import build_tiny_pipeline

        return build_tiny_pipeline(seed=seed)
    if preset.transformer:
        return build_flux_pipeline(preset, seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_sized_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
        tokenizer_2 = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77, pad_token="!")

    def clip_config(fields, **extra):
        return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **fields, **extra)

    text_encoder = CLIPTextModel(clip_config(preset.text, eos_token_id=tokenizer.eos_token_id))
    unet = UNet2DConditionModel(**preset.unet)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **preset.vae)
    if preset.text_2:  # SDXL: its second encoder ships with the legacy eos_token_id 2, as the real one
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=CLIPTextModelWithProjection(clip_config(preset.text_2, eos_token_id=2)),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, add_watermarker=False,
            scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                             timestep_spacing="leading"),
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_flux_pipeline(preset: Preset, seed: int = 0):
    """A FLUX.1 pipeline with the preset's shapes and random weights: CLIP's vocabulary size, T5's 32128
    rows behind the tiny T5 tokenizer (the handles then take ids inside the matrix, as with FLUX's own),
    FLUX.1-dev's scheduler configuration."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from bas.plugins.flux import build_tiny_flux_pipeline

    tokenizer_2 = build_tiny_flux_pipeline().tokenizer_2
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_sized_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=2, **preset.text))  # FLUX's legacy CLIP config
    t5 = T5EncoderModel(T5Config(vocab_size=T5_ROWS, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                 pad_token_id=0, eos_token_id=1, **preset.t5))
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(patch_size=1, **preset.transformer), vae=AutoencoderKL(in_channels=3, out_channels=3, **preset.vae),
        text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
    )
    if preset.name == "flux":  # 12B + 4.7B parameters: bf16 on disk, as FLUX.1 ships
        pipe.to(torch.bfloat16)
    return pipe


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "bas-benchmarks"


def materialize(name: str, cache_dir: Path | None = None) -> Path:
    """The preset saved as a diffusers folder (built on first use, then reused); returns its path."""
    from bas.core import io
    from bas.exports import formats

    preset = PRESETS[name]
    directory = Path(cache_dir or default_cache_dir()) / f"{name}-{preset.key()}"
    if not (directory / "model_index.json").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(directory, directory=True) as tmp:
            formats.save_pipeline(build_pipeline(preset), tmp)  # loadable by transformers 4.x too
    return directory
