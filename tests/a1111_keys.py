"""What AUTOMATIC1111 (stable-diffusion-webui 1.x) makes of a kohya LoRA file and an embedding file, for SD 1.x,
SD 2.x and SDXL: its rules rewritten from

- ``extensions-builtin/Lora/networks.py``: ``convert_diffusers_name_to_compvis`` (diffusers' UNet names to the
  ldm/sgm layout, ``lora_te_``/``lora_te2_`` text-encoder names to its CLIP and OpenCLIP modules),
  ``load_network`` (the name, then ``re_x_proj`` onto a fused attention, then the SDXL fallbacks
  ``lora_unet`` -> ``diffusion_model`` and ``lora_te1_text_model`` -> ``0_transformer_text_model``), and
  ``network_apply_weights`` (an OpenCLIP attention, ``nn.MultiheadAttention`` with one ``in_proj_weight``,
  changes only when the file has all four of its ``q/k/v/out_proj``);
- ``network.py``/``network_lora.py``: a layer needs ``lora_up.weight`` and ``lora_down.weight`` (or peft's
  ``lora_B``/``lora_A``), its change is ``alpha / dim * up @ down`` with ``dim`` the rank (1 without
  ``alpha``); ``NetworkOnDisk.detect_version`` reads the header;
- ``modules/textual_inversion/textual_inversion.py`` (``load_from_file``) and ``modules/sd_hijack.py``
  (``EmbeddingsWithFixes``' ``textual_inversion_key``: ``clip_l``, SDXL's second encoder ``clip_g``).

The module names (A1111's ``network_layer_mapping``) are those of its models: the UNet in ldm/sgm layout
(``diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), SD 1.x's ``FrozenCLIPEmbedder``
(transformers' CLIPTextModel under ``transformer``), SD 2.x's ``FrozenOpenCLIPEmbedder`` (OpenCLIP under
``model.transformer.resblocks``, ``attn``, ``mlp.c_fc``, ``mlp.c_proj``) and SDXL's two embedders prefixed
``0_`` and ``1_``.  A1111 converts UNet names assuming SD's and SDXL's two layers per level, so the
names hold for the real layouts (``benchmarks.presets``), not for the tiny test models with one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                   "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
OPEN_CLIP_LAYERS = {"self_attn.q_proj": None, "self_attn.k_proj": None, "self_attn.v_proj": None,  # in the fused attn
                    "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
CLIP_LAYER = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])")


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """networks.py's conversion, rule by rule."""
    if m := re.match(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = RESNET_SUFFIXES.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = RESNET_SUFFIXES.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = RESNET_SUFFIXES.get(m[4], m[4]) if m[2] == "resnets" else m[4]
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            return f"model_transformer_resblocks_{m[1]}_{open_clip_suffix(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"1_model_transformer_resblocks_{m[1]}_{open_clip_suffix(m[2])}"
    return key


def open_clip_suffix(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


@dataclass(frozen=True)
class Target:
    """One of A1111's modules: the diffusers/transformers layer it is (bas's component and module path), its
    weight's shape, and how it changes: ``layer`` (its own forward applies the change), ``attention`` (an
    OpenCLIP ``nn.MultiheadAttention``: q/k/v go into its ``in_proj_weight``), ``attention_out`` (its
    ``out_proj``, changed only through the attention), ``container`` (no weight)."""

    component: str
    module: str
    shape: tuple
    kind: str = "layer"


def ldm_unet_module(module: str, layers_per_block: int) -> str | None:
    """The ldm/sgm path of a diffusers UNet attention module (``input_blocks.N.1...``), for the model's own
    number of layers per level (checked against ComfyUI's ``unet_to_diffusers`` for SD 1.5, SD 2.1, SDXL)."""
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        return f"input_blocks.{1 + int(m[1]) * (layers_per_block + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        return f"output_blocks.{int(m[1]) * (layers_per_block + 1) + int(m[2])}.1.{m[3]}"
    return None


def layer_mapping(unet: torch.nn.Module, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module | None = None) -> dict[str, Target]:
    """A1111's ``network_layer_mapping`` (its name of every module that a LoRA can change) for a model given as
    diffusers/transformers modules: SD 1.x (a 768-wide CLIP text encoder), SD 2.x (1024 wide: OpenCLIP
    ViT-H, as A1111 loads it) or SDXL (with ``text_encoder_2``: CLIP ViT-L as embedder 0, OpenCLIP bigG as 1)."""
    mapping: dict[str, Target] = {}
    layers = unet.config.layers_per_block
    for name, m in unet.named_modules():
        path = ldm_unet_module(name, layers) if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) else None
        if path:
            mapping["diffusion_model_" + path.replace(".", "_")] = Target("unet", name, tuple(m.weight.shape))
    if text_encoder_2 is not None:
        encoders = [("text_encoder", text_encoder, "0_transformer_", False), ("text_encoder_2", text_encoder_2, "1_model_", True)]
    else:
        open_clip = text_encoder.config.hidden_size == 1024
        encoders = [("text_encoder", text_encoder, "model_" if open_clip else "transformer_", open_clip)]
    for component, encoder, prefix, open_clip in encoders:
        if open_clip:
            mapping[prefix + "transformer_resblocks"] = Target(component, "text_model.encoder.layers", (), "container")
        for name, m in encoder.named_modules():
            match = CLIP_LAYER.fullmatch(name)
            if not match:
                continue
            n, layer = match[1], match[2]
            module = f"text_model.encoder.layers.{n}.{layer}"
            if not open_clip:
                mapping[f"{prefix}text_model_encoder_layers_{n}_{layer.replace('.', '_')}"] = Target(component, module, tuple(m.weight.shape))
            elif OPEN_CLIP_LAYERS[layer] is None:  # q/k/v: rows of the fused attention
                width = m.weight.shape[1]
                mapping[f"{prefix}transformer_resblocks_{n}_attn"] = Target(component, f"text_model.encoder.layers.{n}.self_attn", (3 * width, width), "attention")
            else:
                kind = "attention_out" if layer == "self_attn.out_proj" else "layer"
                mapping[f"{prefix}transformer_resblocks_{n}_{OPEN_CLIP_LAYERS[layer].replace('.', '_')}"] = Target(component, module, tuple(m.weight.shape), kind)
    return mapping


def load_network(lora: dict[str, torch.Tensor], mapping: dict[str, Target]) -> tuple[dict[str, tuple[Target, dict]], list[str]]:
    """``load_network``: ``({A1111 key: (its module, {"lora_up.weight": ..., "alpha": ...})}, [keys it fails
    to match])``.  Raises as A1111 does when a matched layer lacks a factor."""
    is_sd2 = "model_transformer_resblocks" in mapping
    matched: dict[str, tuple[Target, dict]] = {}
    failed = []
    for key_network, weight in lora.items():
        base, _, part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(base, is_sd2)
        target = mapping.get(key)
        if target is None and (m := RE_X_PROJ.match(key)):
            target = mapping.get(m[1])
        if target is None and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            target = mapping.get(key)
        elif target is None and "lora_te1_text_model" in base:
            key = base.replace("lora_te1_text_model", "0_transformer_text_model")
            target = mapping.get(key)
            if target is None:
                key = base.replace("lora_te1_text_model", "transformer_text_model")
                target = mapping.get(key)
        if target is None:
            failed.append(key_network)
            continue
        matched.setdefault(key, (target, {}))[1][part] = weight
    for _target, w in matched.values():
        if {"lora_A.weight", "lora_B.weight"} <= w.keys():
            w["lora_up.weight"], w["lora_down.weight"] = w.pop("lora_B.weight"), w.pop("lora_A.weight")
        if not {"lora_up.weight", "lora_down.weight"} <= w.keys():
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(w)}")
    return matched, failed


def applied(matched: dict[str, tuple[Target, dict]], mapping: dict[str, Target]) -> dict[tuple[str, str], tuple[float, torch.Tensor, torch.Tensor]]:
    """What ``network_apply_weights`` changes at multiplier 1: ``{(component, module): (scale, up, down)}``,
    the change being ``scale * up @ down`` reshaped to the weight (``scale``: alpha / rank, or 1)."""
    def factors(w):
        down = w["lora_down.weight"]
        scale = float(w["alpha"]) / down.shape[0] if "alpha" in w else 1.0
        return scale, w["lora_up.weight"], down

    changes = {}
    for name, target in mapping.items():
        if target.kind == "layer" and name in matched:
            changes[(target.component, target.module)] = factors(matched[name][1])
        elif target.kind == "attention":
            parts = {p: matched.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
            if all(parts.values()):  # the fused attention changes only with all four
                for p, (_, w) in parts.items():
                    changes[(target.component, f"{target.module}.{p}")] = factors(w)
    return changes


def detect_version(metadata: dict[str, str]) -> str:
    """``NetworkOnDisk.detect_version``: which models A1111 lists the LoRA for."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def load_embedding(data: dict[str, torch.Tensor], expected_shape: int) -> tuple[torch.Tensor | dict[str, torch.Tensor], int] | None:
    """``load_from_file`` for a safetensors embedding: ``(vec, vectors)``, or None when A1111 skips it for
    its width (``expected_shape``: the text encoders' widths added up, 2048 for SDXL).  Raises on a file it
    cannot identify, as A1111 does."""
    if "string_to_param" in data:
        raise AssertionError("a .pt-style embedding, which bas does not write")
    if "clip_g" in data and "clip_l" in data:  # SDXL embedding
        vec = {k: v.float() for k, v in data.items()}
        shape, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    elif isinstance(next(iter(data.values())), torch.Tensor):  # diffusers concept
        assert len(data) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        vec = (emb.unsqueeze(0) if emb.dim() == 1 else emb).float()
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise AssertionError("Couldn't identify the file as neither textual inversion embedding nor diffuser concept.")
    return (vec, vectors) if shape == expected_shape else None


def embedding_rows(vec, textual_inversion_key: str) -> torch.Tensor:
    """``EmbeddingsWithFixes``: the rows one text encoder puts in the prompt (``clip_l``; SDXL's second: ``clip_g``)."""
    return vec[textual_inversion_key] if isinstance(vec, dict) else vec
