"""FLUX.1 (dev and schnell): a rectified-flow transformer with joint image-text attention, CLIP-L and T5-XXL.

What differs from the UNet families, each through the family verbs (:mod:`bas.core.hookspecs`):

- **Text.** A prompt becomes T5-XXL's last hidden state (the token sequence the transformer's
  joint attention reads, 512 tokens) and CLIP-L's pooled output (``pooled_projections``).  Every
  handle is a new token in both tokenizers (T5's SentencePiece vocabulary and CLIP's BPE) with one
  trainable row per encoder: T5's 32100 tokens sit in 32128 rows, so its handle rows take the ids
  T5's tokenizer gives them inside the matrix.  FLUX's CLIP-L ships the pre-2023 config
  (``eos_token_id: 2``), which pools the highest token id, a handle once handles exist; the family
  pools the end of the prompt instead (as for SDXL's second encoder).  T5 is frozen apart from its
  handle rows, so its output for a prompt without handles (the prior-preservation class prompt) is
  computed once and reused.
- **The objective.** Rectified flow: ``x_t = (1 - s) x + s noise`` and the target velocity
  ``noise - x``; ``s`` is drawn logit-normal (``sigmoid`` of a standard normal) and shifted as the
  model's scheduler shifts its sampling schedule: by the image's token count where it asks for
  dynamic shifting (dev, as kohya's ``flux_shift`` sampling), else by its fixed ``shift``
  (schnell's is 1: none).  A
  guidance-distilled model (dev: ``guidance_embeds``) gets ``guidance`` 3.5 in training, as
  diffusers' FLUX DreamBooth script sets it.
- **Packed latents.** The VAE's 16 channels are normalised with its ``shift_factor`` and
  ``scaling_factor`` and packed into 2x2 patch tokens for the transformer; :meth:`Flux.predict`
  packs, calls the transformer and unpacks, so masks and the masked loss stay spatial (the same
  elements as packing the mask the same way).
- **Attention maps.** The 19 double-stream blocks run joint attention over ``[text; image]``
  tokens (text first; rotary embeddings on both, the text at position 0).  In the blocks the loss
  reads, :class:`CaptureJointAttention` computes the block's output with the fused kernel as usual
  and, beside it, the image queries' explicit fp32 softmax over all keys, keeping the columns of the
  text keys: ``(B, image tokens, text tokens)`` head-averaged, at the packed grid (half the latent
  side), which the loss averages down to a quarter of the latent side (16x16 at 512 px).
- **Memory.** On CUDA the frozen transformer and T5 load 4-bit (bitsandbytes nf4, bf16 compute) or
  8-bit (``--quantize int8``); LoRA trains on top in bf16 autocast, with gradient checkpointing and
  8-bit AdamW; latents are cached and the VAE leaves the GPU.  Quantised loading is CUDA-only: on a
  CPU the family loads unquantised, which only a tiny model fits, and says so.
- **Weights.** LoRA (peft) on the transformer's attention projections and MLPs of both block kinds
  (and CLIP-L's attention with ``--lora-text-encoder``); a full fine-tune is refused.
- **Files.** ``--format diffusers`` is loaded by ``FluxPipeline.load_lora_weights``; the handles by
  ``load_textual_inversion`` for CLIP-L and a few lines for T5 (diffusers' loader resizes T5's
  padded matrix to the tokenizer's length, which moves no row but drops the padding).
  ``--format kohya`` names the layers as Black Forest Labs' checkpoints do (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_single_blocks_0_linear1``, ``lora_te1_`` for CLIP-L), with the separate q/k/v (and the
  single blocks' MLP input) fused into one block-diagonal LoRA per fused layer, as kohya's FLUX
  scripts write it and ComfyUI and diffusers' kohya converter read it; the embeddings are
  ComfyUI's ``{"clip_l": [1, 768], "t5xxl": [1, 4096]}``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import torch

from bas import hookimpl
from bas.core.compat import diffusers_dtype, transformers_dtype
from bas.core.errors import BasError
from bas.core.family import (
    MIN_ATTENTION_RES,
    default_attention_side,
    Components,
    Conditioning,
    ModelFamily,
    TextEncoder,
    check_model_path,
    MODEL_FILE_ERRORS,
    known_model_file,
    load_error,
    python_str,
)
from bas.plugins.sd import CLIP_ATTENTION
from bas.plugins.sdxl import pool_at_end_of_text

TRAINING_GUIDANCE = 3.5  # diffusers' train_dreambooth_lora_flux.py --guidance_scale
MAX_T5_TOKENS = 512  # FluxPipeline's max_sequence_length limit

# peft targets: the attention projections and MLPs of the double-stream blocks (image and text
# streams) and of the single-stream blocks (q/k/v, the MLP input, the fused output projection).
# A regular expression, so that the model's own top-level proj_out stays out.
TRANSFORMER_TARGETS = (
    r".*(?:^|\.)(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out))"
)


# -- packed latents --------------------------------------------------------------------------------
def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens, row-major, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a latent grid of ``h`` x ``w``."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Rotary position ids ``(h/2 * w/2, 3)`` of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def image_shift(scheduler_config, image_tokens: int) -> float:
    """``mu`` of the resolution-dependent shift (``FluxPipeline``'s ``calculate_shift``)."""
    c = scheduler_config
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_tokens * slope + base - slope * base_len


def shift_sigmas(scheduler_config, sigmas: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """Uniform flow times shifted as the scheduler shifts them: by the image's size where it uses
    dynamic shifting (exponential or linear), else by its fixed ``shift``."""
    c = scheduler_config
    if c.get("use_dynamic_shifting", False):
        mu = image_shift(c, image_tokens)
        if c.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / sigmas - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    shift = c.get("shift", 1.0)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


# -- joint attention -------------------------------------------------------------------------------
def image_text_probabilities(query: torch.Tensor, key: torch.Tensor, text_len: int, attention_mask=None) -> torch.Tensor:
    """Head-averaged fp32 probabilities ``(B, image tokens, text tokens)`` of the image queries over the
    text keys: the joint attention's probabilities at the text keys, renormalised over them (each
    query's row sums to 1), which is the softmax of the text keys' scores alone.  ``query``/``key``
    ``(B, L, heads, d)`` with the text tokens first, as FLUX's attention orders them (after norms and
    rotary embeddings).

    FLUX's softmax runs over text *and* image keys, so the raw probability of a handle at an image
    position is scaled by how much of that query's attention goes to text at all, which varies over
    the image (an edge attends to its neighbours more than a flat region does).  The loss compares
    each handle's map with a 0/1 mask, so that scale would enter the loss as if it were the handle's
    extent; renormalised, a map is what a cross-attention map is in SD and SDXL (a distribution over
    the text tokens per position), and the paper's loss applies to it unchanged."""
    with torch.autocast(query.device.type, enabled=False):
        q = query[:, text_len:].float().transpose(1, 2)  # (B, H, image, d)
        k = key[:, :text_len].float().transpose(1, 2)  # (B, H, text, d)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if attention_mask is not None:
            mask = attention_mask[..., text_len:, :] if attention_mask.dim() == 4 else attention_mask
            mask = mask[..., :text_len]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        return scores.softmax(dim=-1).mean(dim=1)


class CaptureJointAttention:
    """FLUX's joint-attention processor, which also records the image queries' probabilities over
    the text keys (:func:`image_text_probabilities`) in an :class:`bas.core.attention.AttentionStore`.

    The block's output is FluxAttnProcessor's (the fused kernel), so installing it changes nothing
    the model computes; the explicit softmax is computed beside it, for the image queries only."""

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text_len = 0
        if attn.added_kv_proj_dim is not None:
            text_len = encoder_hidden_states.shape[1]
            encoder_query, encoder_key, encoder_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if text_len:
            # computed on every forward, recorded only while recording: gradient checkpointing's recomputation
            # (when the store is empty) must save the same tensors as the forward pass did
            probs = image_text_probabilities(query, key, text_len, attention_mask)
            if self.store.recording():
                self.store.forwards[-1][1].append(probs)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())


# -- kohya's names ---------------------------------------------------------------------------------
# diffusers' module -> (Black Forest Labs' module, part, parts): separate projections that BFL's
# checkpoints (and so kohya's LoRA and ComfyUI) hold as one fused layer
DOUBLE_FUSED = {"attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3), "attn.to_v": ("img_attn.qkv", 2, 3),
                "attn.add_q_proj": ("txt_attn.qkv", 0, 3), "attn.add_k_proj": ("txt_attn.qkv", 1, 3), "attn.add_v_proj": ("txt_attn.qkv", 2, 3)}
DOUBLE_PLAIN = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2", "norm1.linear": "img_mod.lin",
                "norm1_context.linear": "txt_mod.lin"}
SINGLE_FUSED = {"attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4), "proj_mlp": ("linear1", 3, 4)}
SINGLE_PLAIN = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
MLP_RATIO = 4  # the single blocks' MLP width over the model's (linear1 = q, k, v, mlp)


def bfl_module(module: str) -> tuple[str, int, int]:
    """``(BFL module, part, parts)`` of a diffusers FLUX transformer module (``parts`` 1: not fused)."""
    for prefix, bfl, fused, plain in (("transformer_blocks.", "double_blocks.", DOUBLE_FUSED, DOUBLE_PLAIN),
                                      ("single_transformer_blocks.", "single_blocks.", SINGLE_FUSED, SINGLE_PLAIN)):
        if module.startswith(prefix):
            index, _, rest = module[len(prefix):].partition(".")
            if rest in fused:
                name, part, parts = fused[rest]
                return f"{bfl}{index}.{name}", part, parts
            if rest in plain:
                return f"{bfl}{index}.{plain[rest]}", 0, 1
    raise BasError(f"The LoRA adapts the transformer's {module}, which kohya's FLUX names have no place for; export it with --format diffusers.")


def fuse_for_kohya(layers):
    """The transformer's LoRA layers under BFL's names, each fused layer's parts (q, k, v, and the
    single blocks' MLP input) as one block-diagonal LoRA: ``down`` the parts' downs stacked, ``up``
    their ups on the diagonal (each part's scale folded in), zero rows for a part without an adapter.
    ``up @ down`` of the fused layer is then exactly the parts' changes stacked, which diffusers'
    kohya converter splits back (it recognises the block-diagonal layout) and ComfyUI adds to the
    fused weight."""
    from bas.exports.formats import LoraLayer

    groups: dict[str, dict[int, object]] = {}
    out = []
    for layer in layers:
        if layer.component != "transformer":
            out.append(layer)
            continue
        name, part, parts = bfl_module(layer.module)
        if parts == 1:
            out.append(replace(layer, module=name))
            continue
        groups.setdefault(name, {})[part] = layer
    for name, parts in sorted(groups.items()):
        count = 3 if name.endswith("qkv") else 4
        width = next(iter(parts.values())).down.shape[1]
        outs = [width] * 3 + [width * MLP_RATIO] * (count - 3)
        downs, ups = [], []
        for i in range(count):
            layer = parts.get(i)
            if layer is None:
                continue
            downs.append(layer.down.float())
            ups.append((i, layer.up.float() * (layer.alpha / layer.rank)))
        rank = sum(d.shape[0] for d in downs)
        up = torch.zeros(sum(outs), rank)
        row, col = [sum(outs[:i]) for i in range(count)], 0
        for (i, u) in ups:
            up[row[i]: row[i] + outs[i], col: col + u.shape[1]] = u
            col += u.shape[1]
        dtype = next(iter(parts.values())).down.dtype
        out.append(LoraLayer("transformer", name, torch.cat(downs).to(dtype), up.to(dtype), float(rank)))
    return out


# -- the family ------------------------------------------------------------------------------------
class Flux(ModelFamily):
    name = "flux"
    description = "FLUX.1 dev/schnell: rectified-flow transformer, joint attention, CLIP-L pooled + T5-XXL sequence; LoRA, nf4 on CUDA"
    default_model = "black-forest-labs/FLUX.1-dev"
    pipeline_class = "FluxPipeline"
    recognised_pipelines = ("FluxPipeline",)
    denoiser_name = "transformer"
    text_encoder_names = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    sequence_encoder = 1  # T5's tokens are the sequence the joint attention reads
    resolution_multiple = 16  # 8x VAE, then 2x2 patches
    default_resolution = 512  # the 12 GB target; FLUX.1 was trained up to 1024 (--resolution 1024)
    lora_targets = {"transformer": TRANSFORMER_TARGETS, "text_encoder": CLIP_ATTENTION}
    lora_scale_argument = "joint_attention_kwargs"
    export_formats = ("diffusers", "kohya")
    kohya_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}  # kohya's FLUX scripts (T5 would be lora_te3_)
    quantizations = ("nf4", "int8")
    refused_strategies = {"full": "FLUX trains LoRA only (a full fine-tune of its 12B-parameter transformer does not fit a card); "
                                 "leave out --plugin full to train LoRA."}
    schedulers = ("flow-euler",)
    default_scheduler = "flow-euler"
    default_guidance = 3.5  # FluxPipeline's; schnell has no guidance embedding and ignores it
    SCHNELL_SAMPLING = {"steps": 4, "guidance": 0.0}  # diffusers' FluxPipeline example and schnell's model card

    def __init__(self):
        self._t5_cache: dict[tuple, torch.Tensor] = {}

    # -- loading -----------------------------------------------------------------------------------
    def check_quantization(self, quantize, device):
        """bitsandbytes' 4- and 8-bit layers: CUDA only, and the library must import."""
        if device.type != "cuda":
            raise BasError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes' quantised layers); use --quantize none on the {device.type.upper()}.")
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # bitsandbytes raises various errors when its CUDA library is missing
            raise BasError(f"--quantize {quantize} loads FLUX through bitsandbytes, which could not be loaded ({exc}); "
                           "install it with `pip install bitsandbytes`, or pass --quantize none.") from exc

    def check_run(self, device, strategy, quantize):
        super().check_run(device, strategy, quantize)
        if device.type != "cuda":
            warnings.warn(f"FLUX runs unquantised on the {device.type.upper()} (bitsandbytes' 4-bit loading needs CUDA), where only a tiny "
                          "model fits; train FLUX.1 on a CUDA GPU.", stacklevel=2)

    def memory_defaults(self, device, strategy):
        """On a GPU, what fits 12 GB at 512 px: the transformer and T5 in nf4, gradient checkpointing, 8-bit AdamW."""
        if device.type != "cuda":
            return {}
        return {"gradient_checkpointing": True, "optimizer": "adamw8bit", "quantize": "nf4"}

    @staticmethod
    def quantization(library: str, quantize: str, dtype: torch.dtype):
        """bitsandbytes' config for diffusers' or transformers' ``from_pretrained``."""
        import importlib

        config = importlib.import_module(library).BitsAndBytesConfig
        if quantize == "nf4":
            return config(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return config(load_in_8bit=True)

    def load(self, model, plan=None):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        check_model_path(model)
        quantize = plan.quantize if plan else "none"
        dtype = transformers_dtype(plan.dtype) if plan else {}
        try:  # the transformer and T5: quantised where the plan asks
            transformer_kwargs, t5_kwargs = (diffusers_dtype(plan.dtype) if plan else {}), dict(dtype)
            if quantize != "none":  # straight onto the run's GPU: bitsandbytes quantises while it places the weights
                transformer_kwargs.update(quantization_config=self.quantization("diffusers", quantize, plan.dtype), device_map={"": plan.device})
                t5_kwargs.update(quantization_config=self.quantization("transformers", quantize, plan.dtype), device_map={"": plan.device})
            transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", **transformer_kwargs)
            t5 = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2", **t5_kwargs)
            clip = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **dtype)
            tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
            tokenizer_2 = T5TokenizerFast.from_pretrained(model, subfolder="tokenizer_2")
            vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
        except MODEL_FILE_ERRORS as exc:
            raise load_error(model, exc) from exc
        encoders = [TextEncoder("text_encoder", "tokenizer", clip, tokenizer), TextEncoder("text_encoder_2", "tokenizer_2", t5, tokenizer_2)]
        pool_at_end_of_text(encoders[0])
        self._t5_cache.clear()
        return Components(self, encoders, transformer, vae, scheduler, self.denoiser_name)

    def native_resolution(self, components):
        return min(self.default_resolution, components.vae.config.sample_size)

    def prediction_type(self, noise_scheduler) -> str:
        return "flow"

    # -- text ----------------------------------------------------------------------------------------
    def conditioning(self, components, input_ids, size):
        clip, t5 = components.text_encoders
        pooled = clip.model(input_ids[0]).pooler_output
        return Conditioning(self.t5_states(t5, input_ids[1]), {"pooled_projections": pooled})

    def t5_states(self, t5: TextEncoder, ids: torch.Tensor) -> torch.Tensor:
        """T5's last hidden state; for prompts without handles computed once: T5 trains nothing but its
        handle rows (no LoRA), so their states cannot change during a run."""
        embedding = t5.model.get_input_embeddings()
        first = getattr(embedding, "first_id", None)
        # the ids read as numbers, not through tensor operations: a memory plan (bas.memory) runs this among fake tensors
        values = [i for row in ids.tolist() for i in row]
        if first is None or any(first <= i < first + embedding.handles.shape[0] for i in values):
            return t5.model(ids)[0]
        key = (tuple(values), tuple(ids.shape), str(ids.device), torch.is_autocast_enabled(ids.device.type))
        if key not in self._t5_cache:
            with torch.no_grad():
                if len(self._t5_cache) >= 32:
                    self._t5_cache.clear()
                self._t5_cache[key] = t5.model(ids)[0].detach()
        return self._t5_cache[key]

    def variant_sampling(self, model):
        """FLUX.1-schnell (timestep-distilled, no guidance embedding) samples in 4 steps with guidance 0,
        as its model card and diffusers' example do; dev and its fine-tunes keep 50 and 3.5.  Told from
        the transformer's config (``guidance_embeds``) where it is at hand, else from the name."""
        config = known_model_file(model, "transformer/config.json")
        schnell = not config.get("guidance_embeds", True) if config is not None else "schnell" in model.lower()
        return dict(self.SCHNELL_SAMPLING) if schnell else {}

    def unconditional(self, components, encode):
        """None: FLUX.1 is guidance-distilled (dev) or guidance-free (schnell); it samples with one pass."""
        return None

    # -- latents and the objective -------------------------------------------------------------------
    def scale_latents(self, vae, sample):
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

    def unscale_latents(self, vae, latents):
        return latents / vae.config.scaling_factor + vae.config.shift_factor

    def training_noise(self, scheduler, latents, generator):
        """Rectified flow: ``s`` logit-normal, shifted by the scheduler's rule for this image size;
        ``x_s = (1 - s) x + s noise``; the target is the velocity ``noise - x``; timesteps ``1000 s``."""
        b, _, h, w = latents.shape
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        u = torch.sigmoid(torch.randn((b,), generator=generator, device=latents.device))
        sigmas = shift_sigmas(scheduler.config, u, (h // 2) * (w // 2))
        s = sigmas.view(b, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        return noise, sigmas * scheduler.config.num_train_timesteps, noisy, noise - latents

    def noised(self, scheduler, latents, noise, timesteps):
        s = (timesteps.float() / 1000).view(-1, 1, 1, 1)
        return (1 - s) * latents + s * noise

    def probe_timestep(self, scheduler, fraction, device):
        return torch.tensor([fraction * scheduler.config.num_train_timesteps], device=device)

    def sampling_scheduler(self, noise_scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    def set_timesteps(self, scheduler, steps, device, latents):
        """As ``FluxPipeline``: sigmas from 1 to 1/steps, shifted by the image's token count."""
        sigmas = np.linspace(1.0, 1 / steps, steps)
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        mu = image_shift(scheduler.config, tokens) if scheduler.config.get("use_dynamic_shifting", False) else None
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def predict(self, denoiser, latents, timesteps, cond, guidance: float = TRAINING_GUIDANCE, **kwargs):
        b, _, h, w = latents.shape
        dtype = self.compute_dtype(denoiser)
        t = timesteps.float().reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps.float()
        g = torch.full((b,), float(guidance), device=latents.device) if denoiser.config.guidance_embeds else None
        text = cond.hidden_states
        out = denoiser(
            hidden_states=pack(latents).to(dtype), encoder_hidden_states=text, pooled_projections=cond.extra["pooled_projections"],
            timestep=t / 1000, img_ids=image_ids(h, w, latents.device, dtype), txt_ids=text.new_zeros(text.shape[1], 3, dtype=dtype),
            guidance=g, joint_attention_kwargs=kwargs.get("joint_attention_kwargs"), return_dict=False,
        )[0]
        return unpack(out, h, w)

    @staticmethod
    def compute_dtype(denoiser) -> torch.dtype:
        """The dtype the transformer computes in: its first floating-point weight's (a quantised model's
        packed weights are integers)."""
        return next(p.dtype for p in denoiser.parameters() if p.is_floating_point())

    def guided_prediction(self, denoiser, latents, t, cond, uncond, guidance, **kwargs):
        """One pass, ``guidance`` into dev's guidance embedding (schnell has none)."""
        return self.predict(denoiser, latents, t, cond, guidance=guidance, **kwargs).float()

    # -- the attention loss --------------------------------------------------------------------------
    def attention_layers(self, components, latent_size):
        """The double-stream blocks' joint attention (image and text streams with their own projections,
        the counterpart of a UNet's cross-attention), at the packed grid: half the latent side."""
        return {f"transformer_blocks.{i}.attn": (block.attn, latent_size // 2)
                for i, block in enumerate(components.denoiser.transformer_blocks)}

    def attention_resolution(self, available, latent_size, requested=None):
        """:func:`bas.core.family.default_attention_side` (16x16 at 512 px), area-averaged from the packed
        grid; a requested side must divide the packed grid's."""
        grid = max(available)
        usable = [r for r in range(MIN_ATTENTION_RES, grid + 1) if grid % r == 0]
        if requested is not None:
            if requested not in usable:
                raise BasError(f"--attention-res {requested} does not divide the {grid}x{grid} grid of FLUX's packed tokens at this resolution "
                               f"(or is below {MIN_ATTENTION_RES}); use one of {usable or 'none: train at a higher --resolution'}.")
            return requested
        if not usable:
            raise BasError(f"FLUX's attention maps are {grid}x{grid} at this resolution, too small for a mask; train at a higher --resolution.")
        target = default_attention_side(latent_size)
        return min(usable, key=lambda r: (abs(math.log(r / target)), -r))

    def capture_processor(self, store):
        return CaptureJointAttention(store)

    # -- pipelines -------------------------------------------------------------------------------------
    def check_sampling(self, negative_prompt):
        if negative_prompt:
            raise BasError("FLUX.1 samples without classifier-free guidance, so --negative-prompt has no effect; leave it out.")

    def pipeline_from_components(self, components, scheduler):
        from diffusers import FluxPipeline

        (clip, t5) = components.text_encoders
        return FluxPipeline(scheduler=scheduler, vae=components.vae, text_encoder=clip.model, tokenizer=clip.tokenizer,
                            text_encoder_2=t5.model, tokenizer_2=t5.tokenizer, transformer=components.denoiser)

    def load_pipeline(self, model, device, dtype, quantize="none"):
        from diffusers import FluxPipeline

        check_model_path(model)
        kwargs = {}
        if quantize != "none":
            from diffusers import PipelineQuantizationConfig

            backend = "bitsandbytes_4bit" if quantize == "nf4" else "bitsandbytes_8bit"
            args = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype} if quantize == "nf4" else {"load_in_8bit": True}
            kwargs["quantization_config"] = PipelineQuantizationConfig(quant_backend=backend, quant_kwargs=args,
                                                                       components_to_quantize=["transformer", "text_encoder_2"])
        try:
            pipe = FluxPipeline.from_pretrained(model, **diffusers_dtype(dtype), **kwargs)
        except MODEL_FILE_ERRORS as exc:
            raise load_error(model, exc) from exc
        pool_at_end_of_text(TextEncoder("text_encoder", "tokenizer", pipe.text_encoder, pipe.tokenizer))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def prompt_conditioning(self, pipe, prompt, negative_prompt, guided, lora_scale, size):
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=pipe.device, num_images_per_prompt=1,
                                               max_sequence_length=min(MAX_T5_TOKENS, pipe.tokenizer_2.model_max_length), lora_scale=lora_scale)
        return Conditioning(embeds, {"pooled_projections": pooled}), None

    # -- files ---------------------------------------------------------------------------------------
    def kohya_base(self, info):
        """As kohya's FLUX scripts write their LoRA (``flux1``, Stability's ``flux-1-dev/lora``)."""
        schnell = "schnell" in str(info.get("model", "")).lower()
        arch = "flux-1-schnell" if schnell else "flux-1-dev"
        return {"version": "flux1", "v2": False, "architecture": f"{arch}/lora", "resolution": self.default_resolution,
                "label": "FLUX.1 schnell" if schnell else "FLUX.1 dev", "prediction_type": "flow"}

    def kohya_layers(self, layers):
        return fuse_for_kohya(layers)

    def textual_inversion(self, token, rows):
        """Both rows of a handle, named as ComfyUI's FLUX text encoders read embeddings: ``{"clip_l":
        tensor[1, 768], "t5xxl": tensor[1, 4096]}`` (diffusers' loader takes each row on its own)."""
        return {"clip_l": rows["text_encoder"].float()[None], "t5xxl": rows["text_encoder_2"].float()[None]}

    def webui_embedding(self, rows):
        return self.textual_inversion("", rows)

    def textual_inversion_code(self, files):
        pairs = ", ".join(f"({python_str(token)}, {python_str(path)})" for token, path in files)
        return [  # after the card's `import torch`
            "from safetensors.torch import load_file",
            f"for token, path in [{pairs}]:",
            "    state = load_file(path)  # one row per text encoder",
            '    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)',
            "    # T5: diffusers' loader would shrink T5's padded matrix; add the token and set its row instead",
            "    pipe.tokenizer_2.add_tokens([token])",
            "    index = pipe.tokenizer_2.convert_tokens_to_ids(token)",
            "    if index >= pipe.text_encoder_2.get_input_embeddings().num_embeddings:",
            "        pipe.text_encoder_2.resize_token_embeddings(index + 1)",
            "    with torch.no_grad():",
            '        pipe.text_encoder_2.get_input_embeddings().weight[index] = state["t5xxl"][0]',
            "# pool the prompt's end, as bas trained (FLUX's CLIP config pools the highest token id: a handle)",
            'getattr(pipe.text_encoder, "text_model", pipe.text_encoder).eos_token_id = pipe.tokenizer.eos_token_id',
        ]

    def tiny_pipeline(self, seed=0, prediction_type="epsilon", sample_size=16):
        if prediction_type != "epsilon":
            raise BasError("A FLUX pipeline predicts a flow velocity, not epsilon or v; leave out --prediction-type with --family flux.")
        return build_tiny_flux_pipeline(seed=seed, sample_size=sample_size)


# -- a tiny FLUX for tests -------------------------------------------------------------------------
def train_sentencepiece(words, vocab_size: int = 200) -> bytes:
    """A T5-style SentencePiece unigram model (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no ``<s>``) trained
    on ``words``: each word becomes one piece, as in a real T5 vocabulary, and the rest is pieces."""
    import io

    import sentencepiece as spm

    sentences = [w for w in words for _ in range(50)] + [" ".join(words[i: i + 5]) for i in range(0, len(words), 2)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False,
                                   shuffle_input_sentence=False, seed_sentencepiece_size=10000)
    return model.getvalue()


def build_tiny_flux_pipeline(seed: int = 0, sample_size: int = 16, guidance_embeds: bool = True):
    """A tiny random FLUX.1 pipeline: FLUX's structure (double- and single-stream blocks with rotary
    embeddings and a guidance embedding like dev, a 16-channel-style VAE with shift and scale factors,
    here 4 channels and 8x, CLIP-L with its legacy pooling config, T5 with SentencePiece tokens padded
    to more embedding rows than the tokenizer has, 512 tokens) at a size that trains in milliseconds
    per step on a CPU; ``sample_size`` latent cells a side (x8 for pixels)."""
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from bas.demo.tiny import WORDS, write_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
        (Path(tmp) / "spiece.model").write_bytes(train_sentencepiece(WORDS))
        tokenizer_2 = T5TokenizerFast.from_pretrained(tmp, model_max_length=MAX_T5_TOKENS, extra_ids=100)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=2, pad_token_id=tokenizer.pad_token_id, projection_dim=32, hidden_act="quick_gelu",
    ))
    rows = (len(tokenizer_2) + 7) // 8 * 8 + 8  # T5's matrix is padded past its tokenizer (32128 rows for 32100 tokens)
    t5 = T5EncoderModel(T5Config(vocab_size=rows, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=sample_size * 8,
        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                        transformer=transformer)


@hookimpl
def bas_register_model_families(register):
    register("flux", Flux, description=Flux.description)
