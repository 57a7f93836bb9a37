"""What ComfyUI makes of a LoRA file for SD 1.x/2.x and SDXL: its key map and LoRA reader, rewritten from its
``comfy/lora.py`` (``model_lora_keys_unet``, ``model_lora_keys_clip``, ``load_lora``),
``comfy/weight_adapter/lora.py`` (``LoRAAdapter.load``, ``calculate_weight``) and ``comfy/utils.py``
(``unet_to_diffusers``, which names the UNet's layers as diffusers does), and what its tokenizers read from an
embedding file (``comfy/sd1_clip.py``'s ``load_embed``, ``comfy/sdxl_clip.py``'s ``clip_g`` tokenizer).

ComfyUI applies a LoRA layer only where a key of the file is one of its names for a model weight
followed by one of the endings it reads; any other key is skipped with "lora key not loaded".
``tools/comfyui_check.py`` runs ComfyUI's own functions on SD 1.5, SD 2.1 and SDXL layouts; this module
lets the tests check the same rules on the tiny models without ComfyUI installed.
"""

from __future__ import annotations

import re

import torch

# The weights of a UNet's transformer blocks that unet_to_diffusers converts (UNET_MAP_ATTENTIONS,
# TRANSFORMER_BLOCKS): a diffusers LoRA can adapt these.
ATTENTION_LAYERS = ("proj_in", "proj_out", "norm")
TRANSFORMER_BLOCK_LAYERS = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                            "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
UNET_LAYER = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.("
                        + "|".join(map(re.escape, ATTENTION_LAYERS)) + r"|transformer_blocks\.\d+\.("
                        + "|".join(map(re.escape, TRANSFORMER_BLOCK_LAYERS)) + "))")
# LORA_CLIP_MAP: the text encoder's layers, with their kohya spelling.
CLIP_LAYERS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
               "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
               "self_attn.out_proj": "self_attn_out_proj"}
CLIP_LAYER = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(" + "|".join(map(re.escape, CLIP_LAYERS)) + r")\.weight")
# LoRAAdapter.load: the (up, down) endings it reads, in its order.
FACTOR_ENDINGS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                  (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"), (".lora_B", ".lora_A"),
                  (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                  (".lora_B.default.weight", ".lora_A.default.weight"))


def key_map(unet: torch.nn.Module, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module | None = None) -> dict[str, tuple[str, str, torch.Size]]:
    """ComfyUI's names of a LoRA layer (without the endings) -> (component, module, weight shape), for an
    SD UNet and its CLIP text encoder (``clip_l``/``clip_h``) given as diffusers/transformers models;
    text-encoder modules named with ``text_model.`` whatever the transformers version.  With
    ``text_encoder_2``, an SDXL model: ``clip_l`` also answers to ``lora_te1_``, and ``clip_g`` (as
    ``model_lora_keys_clip`` maps it when ``clip_l`` is present) to ``lora_te2_`` and ``text_encoder_2.``."""
    names = {}
    for name, weight in unet.named_parameters():
        module = name.replace(".base_layer.", ".").removesuffix(".weight")  # a layer peft adapts, as its model names it
        if module == name or not UNET_LAYER.fullmatch(module):
            continue
        target = ("unet", module, weight.shape)
        names["lora_unet_" + module.replace(".", "_")] = target
        for prefix in ("", "unet."):  # diffusers' attention-processor names
            key = prefix + module.replace(".to_", ".processor.to_")
            names[key[:-2] if key.endswith(".to_out.0") else key] = target
    encoders = [("text_encoder", text_encoder, ("lora_te_", "lora_te1_") if text_encoder_2 is not None else ("lora_te_",))]
    if text_encoder_2 is not None:
        encoders.append(("text_encoder_2", text_encoder_2, ("lora_te2_",)))
    for component, encoder, prefixes in encoders:
        for name, weight in encoder.named_parameters():
            match = CLIP_LAYER.fullmatch(name.replace(".base_layer.", "."))
            if match and int(match[1]) < 32:
                target = (component, f"text_model.encoder.layers.{match[1]}.{match[2]}", weight.shape)
                for prefix in prefixes:
                    names[f"{prefix}text_model_encoder_layers_{match[1]}_{CLIP_LAYERS[match[2]]}"] = target
                names[f"{component}.text_model.encoder.layers.{match[1]}.{match[2]}"] = target
    return names


def read_lora(lora: dict[str, torch.Tensor], names: dict) -> tuple[dict[tuple[str, str], tuple[float, torch.Tensor, torch.Tensor]], list[str]]:
    """``({(component, module): (scale, up, down)}, [keys ComfyUI does not load])``: the factors ComfyUI reads for
    each layer, its change at strength 1 being ``scale * up @ down`` (``scale``: alpha / rank; without an
    ``.alpha`` key ComfyUI applies ``up @ down`` as it is)."""
    loaded, factors = set(), {}
    for name, (component, module, _shape) in names.items():
        alpha = lora.get(f"{name}.alpha")
        if alpha is not None:
            loaded.add(f"{name}.alpha")
        for up, down in FACTOR_ENDINGS:
            if name + up in lora:
                u, d = lora[name + up], lora[name + down]
                loaded |= {name + up, name + down}
                factors[(component, module)] = (float(alpha) / d.shape[0] if alpha is not None else 1.0, u, d)
                break
    return factors, [k for k in lora if k not in loaded]


def load_lora(lora: dict[str, torch.Tensor], names: dict) -> tuple[dict[tuple[str, str], torch.Tensor], list[str]]:
    """``({(component, module): the change ComfyUI adds to its weight at strength 1}, [keys it does not
    load])``."""
    factors, left_out = read_lora(lora, names)
    shapes = {(component, module): shape for component, module, shape in names.values()}
    changes = {k: (u.flatten(1).float() @ d.flatten(1).float()).reshape(shapes[k]) * scale for k, (scale, u, d) in factors.items()}
    return changes, left_out


# sd1_clip.py's tokenizers: which key of an embedding file each text encoder reads (SDTokenizer's
# embedding_key) and the width it takes (embedding_size).
EMBEDDING_KEYS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}


def load_embed(embed: dict[str, torch.Tensor], embed_key: str) -> torch.Tensor:
    """``sd1_clip.load_embed`` for a safetensors file: the rows one text encoder gets (``embed_key``: SD 1.x's
    ``clip_l``, SD 2.x's ``clip_h``, SDXL's ``clip_l`` and ``clip_g``)."""
    if "string_to_param" in embed:
        return next(iter(embed["string_to_param"].values()))
    if embed_key in embed:
        return embed[embed_key]
    bundled = [v for k, v in embed.items() if k.startswith("bundle_emb.") and k.endswith(f".{embed_key}")]
    return torch.cat(bundled) if bundled else next(iter(embed.values()))



# FLUX (comfy/utils.py ``flux_to_diffusers``, comfy/lora.py's Flux branch of ``model_lora_keys_unet``):
# ComfyUI holds the transformer in Black Forest Labs' layout, where q/k/v (and a single block's MLP
# input) are one fused weight; a diffusers LoRA's separate layers land in slices of it.
FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
               "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
               "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}


def flux_key_map(transformer: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, tuple[str, tuple[int, int] | None, torch.Size]]:
    """ComfyUI's names of a FLUX LoRA layer -> (its weight in BFL's layout, (first row, rows) of a slice or
    None, the weight's shape): ``transformer.<diffusers module>`` and ``lora_transformer_...`` for diffusers'
    names, ``lora_unet_<BFL module>`` for kohya's, and CLIP-L as ``lora_te1_``, ``text_encoder.``."""
    config = transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    names = {}

    def add(diffusers_module, bfl, offset, rows):
        target = (bfl, offset, torch.Size((rows, hidden)))
        names["transformer." + diffusers_module] = target
        names["lora_transformer_" + diffusers_module.replace(".", "_")] = target
        names["lora_unet_" + bfl.replace(".", "_")] = (bfl, None, torch.Size((rows, hidden)))

    for i in range(config.num_layers):
        for j, p in enumerate(("to_q", "to_k", "to_v")):
            add(f"transformer_blocks.{i}.attn.{p}", f"double_blocks.{i}.img_attn.qkv", (j * hidden, hidden), 3 * hidden)
        for j, p in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            add(f"transformer_blocks.{i}.attn.{p}", f"double_blocks.{i}.txt_attn.qkv", (j * hidden, hidden), 3 * hidden)
        block = transformer.transformer_blocks[i]
        for module, bfl in FLUX_DOUBLE.items():
            weight = block.get_submodule(module).weight
            target = (f"double_blocks.{i}.{bfl}", None, torch.Size(weight.shape))
            for key in (f"transformer.transformer_blocks.{i}.{module}", f"lora_transformer_transformer_blocks_{i}_{module.replace('.', '_')}",
                        f"lora_unet_double_blocks_{i}_{bfl.replace('.', '_')}"):
                names[key] = target
    for i in range(config.num_single_layers):
        fused = f"single_blocks.{i}.linear1"
        rows = 3 * hidden + 4 * hidden
        for j, p in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            add(f"single_transformer_blocks.{i}.{p}", fused, (j * hidden, hidden), rows)
        add(f"single_transformer_blocks.{i}.proj_mlp", fused, (3 * hidden, 4 * hidden), rows)
        block = transformer.single_transformer_blocks[i]
        for module, bfl in FLUX_SINGLE.items():
            weight = block.get_submodule(module).weight
            target = (f"single_blocks.{i}.{bfl}", None, torch.Size(weight.shape))
            for key in (f"transformer.single_transformer_blocks.{i}.{module}", f"lora_unet_single_blocks_{i}_{bfl.replace('.', '_')}"):
                names[key] = target
    for name, weight in text_encoder.named_parameters():
        match = CLIP_LAYER.fullmatch(name.replace(".base_layer.", "."))
        if match:
            target = (f"clip_l.text_model.encoder.layers.{match[1]}.{match[2]}", None, weight.shape)
            names[f"lora_te1_text_model_encoder_layers_{match[1]}_{CLIP_LAYERS[match[2]]}"] = target
            names[f"text_encoder.text_model.encoder.layers.{match[1]}.{match[2]}"] = target
    return names


def load_flux_lora(lora: dict[str, torch.Tensor], names: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``({weight in BFL's layout: the change ComfyUI adds at strength 1}, [keys it does not load])``;
    slices of a fused weight add up."""
    loaded, changes = set(), {}
    for name, (weight, offset, shape) in names.items():
        alpha = lora.get(f"{name}.alpha")
        for up, down in FACTOR_ENDINGS:
            if name + up in lora:
                u, d = lora[name + up], lora[name + down]
                loaded |= {name + up, name + down} | ({f"{name}.alpha"} if alpha is not None else set())
                scale = float(alpha) / d.shape[0] if alpha is not None else 1.0
                change = changes.setdefault(weight, torch.zeros(shape))
                rows = slice(offset[0], offset[0] + offset[1]) if offset else slice(None)
                change[rows] += (u.float() @ d.float()) * scale
                break
    return changes, [k for k in lora if k not in loaded]
