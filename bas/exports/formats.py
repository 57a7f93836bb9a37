"""Files that other tools and older library versions read: LoRA and pipelines.

Each rule below was checked against the loaders (docs/outputs.md, "Checked against the loaders"):

- A text encoder's modules are named as transformers 4.x names them, ``text_model.encoder...``
  (transformers 5 drops the ``text_model.`` level of ``CLIPTextModel``).  diffusers 0.2x-0.3x,
  ComfyUI and kohya's tools only know those names; transformers 5 and diffusers 0.3x+ map them
  back when their model lacks the level.
- A diffusers LoRA names its UNet layers as diffusers' attention processors did
  (``unet.<...>.attn1.processor.to_q_lora.down.weight``, ``to_k_lora``, ``to_v_lora``, ``to_out_lora``;
  other layers ``unet.<module>.lora.down.weight``), which every diffusers version converts on loading
  and ComfyUI maps for SD UNets (it does not map peft's ``unet.<module>.lora_A.weight``), and its text
  encoders' layers with peft's names (``text_encoder.text_model.<module>.lora_A.weight``), which every
  diffusers version and ComfyUI read.  Its header holds no peft config (older peft rejects the fields
  newer peft writes there).  Without a config every loader takes alpha = rank, and older diffusers give
  every layer the *first* layer's rank as alpha: so each layer's scale ``alpha / rank`` is folded into
  its up factor and all layers have one rank (smaller ones padded with zeros), which every loader then
  applies at exactly scale 1.
- A transformer's LoRA (FLUX) keeps peft's names in diffusers' layout
  (``transformer.<module>.lora_A.weight``), which ``FluxPipeline.load_lora_weights`` and ComfyUI read;
  kohya's FLUX layout names Black Forest Labs' fused layers, which the family makes
  (``ModelFamily.kohya_layers``).
- A kohya LoRA has one alpha for all layers, each layer's scale folded into ``lora_up``:
  diffusers' kohya converter assigns per-layer alphas to the wrong layers when they differ.
- A saved pipeline's CLIP tokenizer also has ``vocab.json`` and ``merges.txt``, which
  transformers 4.x's ``CLIPTokenizer`` needs (transformers 5 writes only ``tokenizer.json``).

The naming of modules (the components' key prefixes in ``COMPONENTS``, text-encoder paths,
diffusers' and kohya's key names, the layers kohya's LoRA covers) is kept in the first section, the
only one a model family with other module names would extend.  A model family gives its own kohya
prefixes (``ModelFamily.kohya_prefixes``: SD's ``lora_te_``, SDXL's ``lora_te1_``/``lora_te2_``),
which the functions that name kohya keys take as ``prefixes``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from bas.core import io
from bas.core.errors import BasError

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


# -- module naming ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentNames:
    """How one pipeline component's LoRA layers are named in the files."""

    diffusers: str  # the key prefix in diffusers' layout, the component's name in the pipeline
    kohya: str  # the key prefix in kohya's layout
    text_encoder: bool  # a CLIP text encoder (``text_model.`` paths, peft's key names); else a denoiser
    processor_names: bool = True  # a UNet: attention projections named as diffusers' attention processors had them


# Every component a LoRA file can hold, the one table of prefixes.  The kohya prefixes are SD
# 1.x/2.x's; a family with several text encoders names them its own way (``prefixes`` below).
COMPONENTS = {
    "unet": ComponentNames("unet", "lora_unet_", text_encoder=False),
    "text_encoder": ComponentNames("text_encoder", "lora_te_", text_encoder=True),
    "text_encoder_2": ComponentNames("text_encoder_2", "lora_te2_", text_encoder=True),
    # a transformer (FLUX): peft's names as diffusers' transformer LoRA loaders and ComfyUI read them
    "transformer": ComponentNames("transformer", "lora_unet_", text_encoder=False, processor_names=False),
}
TEXT_MODEL_PREFIX = "text_model."
# A UNet attention's projections, and their names as diffusers' attention processors had them.
ATTENTION_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}
ATTENTION_PROJECTION = re.compile(r"(.+)\.(to_q|to_k|to_v|to_out\.0)")
# The endings of a layer's factors in the layouts diffusers reads: peft's, its own older ones, and
# its attention processors' (``...attn1.processor.to_q_lora.down.weight``).
DIFFUSERS_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                      ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
                      ".lora_linear_layer.up.weight": "up", "_lora.down.weight": "down", "_lora.up.weight": "up"}


def text_encoder_module(module: str) -> str:
    """A CLIP text-encoder module's path as transformers 4.x, diffusers 0.2x-0.3x and kohya name it."""
    return module if module.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + module


def standard_module(component: str, module: str) -> str:
    return text_encoder_module(module) if COMPONENTS[component].text_encoder else module


def kohya_name(component: str, module: str, prefixes: dict[str, str] | None = None) -> str:
    """``lora_unet_down_blocks_0_..._to_q`` / ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``
    (SDXL: ``lora_te1_...``, ``lora_te2_...``), with the model family's ``prefixes`` (default: SD's)."""
    prefixes = prefixes or {c: names.kohya for c, names in COMPONENTS.items() if c != "text_encoder_2"}
    if component not in prefixes:
        raise BasError(f"The LoRA has {component} layers, which the kohya names {', '.join(prefixes.values())} have no place for; "
                       "export the run with the model family it was trained with (run.json's \"family\").")
    return prefixes[component] + standard_module(component, module).replace(".", "_")


def diffusers_keys(component: str, module: str) -> tuple[str, str]:
    """The keys of a layer's down and up factors in a diffusers LoRA:
    ``unet.<...>.attn1.processor.to_q_lora.down.weight`` for a UNet attention's projections,
    ``unet.<module>.lora.down.weight`` for the UNet's other layers, and
    ``text_encoder.text_model.<module>.lora_A.weight`` / ``.lora_B.weight`` for a text encoder's, and
    ``transformer.<module>.lora_A.weight`` for a transformer's (FLUX)."""
    names = COMPONENTS[component]
    if names.text_encoder:
        stem = f"{names.diffusers}.{text_encoder_module(module)}"
        return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
    if not names.processor_names:
        return f"{names.diffusers}.{module}.lora_A.weight", f"{names.diffusers}.{module}.lora_B.weight"
    projection = ATTENTION_PROJECTION.fullmatch(module)
    if projection:
        stem = f"{names.diffusers}.{projection[1]}.processor.{ATTENTION_PROCESSOR_NAMES[projection[2]]}_lora"
    else:
        stem = f"{names.diffusers}.{module}.lora"
    return f"{stem}.down.weight", f"{stem}.up.weight"


def parse_diffusers_key(key: str) -> tuple[str, str, str] | None:
    """``(component, module, "down" or "up")`` of a key of a diffusers LoRA in any of the layouts
    diffusers has read: peft's ``lora_A``/``lora_B``, ``lora.down``/``lora.up``, ``lora_linear_layer``
    and the attention processors' ``processor.to_q_lora.down``; None for any other key."""
    prefix, _, rest = key.partition(".")
    component = next((c for c, names in COMPONENTS.items() if names.diffusers == prefix), None)
    if component is None:
        return None
    for suffix, kind in DIFFUSERS_SUFFIXES.items():  # noqa: B007 (the matched kind is read after the loop)
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            break
    else:
        return None
    if suffix.startswith("_lora."):  # <...>.attnN.processor.to_q_lora.down.weight
        head, _, name = module.rpartition(".processor.")
        projection = next((p for p, n in ATTENTION_PROCESSOR_NAMES.items() if n == name), None)
        if not head or projection is None:
            return None
        module = f"{head}.{projection}"
    return (component, module, kind) if module else None


def kohya_targets(component: str, name: str, module: torch.nn.Module) -> bool:
    """The layers kohya's LoRA (``networks/lora.py``) adapts and its extraction covers.

    UNet: the linear layers and 1x1 convolutions of the transformer blocks (SD 1.x's ``proj_in`` and
    ``proj_out`` are 1x1 convolutions, SD 2.x's are linear); text encoder: attention and MLP layers.
    """
    if not COMPONENTS[component].text_encoder:
        if ".attentions." not in name:
            return False
        return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1))
    return ".layers." in name and isinstance(module, torch.nn.Linear)


def base_model_version(v2: bool, v_prediction: bool) -> str:
    """kohya's ``ss_base_model_version`` for SD 1.x/2.x: ``sd_v1``, ``sd_v2``, ``sd_v2_v``, ..."""
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_prediction else "")


def modelspec_architecture(v2: bool, v_prediction: bool) -> str:
    """Stability's model-spec architecture id of a LoRA for SD 1.x/2.x, as kohya writes it."""
    base = ("stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
    return base + "/lora"


# -- LoRA layers -----------------------------------------------------------------------------------
@dataclass
class LoraLayer:
    """One adapted layer: ``W + alpha / rank * up @ down`` (4-D factors for a 1x1 convolution)."""

    component: str  # "unet" or "text_encoder"
    module: str  # the module's path inside the component, text-encoder paths with "text_model."
    down: torch.Tensor  # (rank, in) or (rank, in, 1, 1)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    def __post_init__(self):
        self.module = standard_module(self.component, self.module)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scaled_up(self, alpha: float) -> torch.Tensor:
        """``up`` with this layer's scale folded in, for a loader that applies ``alpha / rank``."""
        return (self.up.float() * (self.alpha / alpha)).to(self.up.dtype).contiguous()

    def padded(self, rank: int) -> "LoraLayer":
        """The same product at a higher rank: zero rows in ``down``, zero columns in ``up``."""
        extra = rank - self.rank
        if extra <= 0:
            return self
        down = torch.cat([self.down, self.down.new_zeros((extra, *self.down.shape[1:]))], 0)
        up = torch.cat([self.up, self.up.new_zeros((self.up.shape[0], extra, *self.up.shape[2:]))], 1)
        return LoraLayer(self.component, self.module, down, up, self.alpha * rank / self.rank)


def peft_layers(component: str, state_dict: dict[str, torch.Tensor], alpha: float) -> list[LoraLayer]:
    """The layers of a peft state dict (``get_peft_model_state_dict``) trained with one ``alpha``."""
    layers = []
    for key, down in state_dict.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            layers.append(LoraLayer(component, module, down.detach().cpu(), state_dict[f"{module}.lora_B.weight"].detach().cpu(), float(alpha)))
    return layers


# -- diffusers' layout -----------------------------------------------------------------------------


def read_diffusers_lora(path: Path) -> list[LoraLayer]:
    """The layers of a diffusers-format LoRA: what ``bas run`` writes now, and the layouts of earlier bas
    versions (peft's ``lora_A`` names in the UNet too, transformers-5 text-encoder paths, a peft config in
    the header)."""
    from bas.core.runs import read_weights

    path = Path(path)
    tensors = read_weights(path)  # a damaged or empty file: one line naming it (every command reads a run's weights there)
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    except (OSError, ValueError) as exc:
        raise BasError(f"{path} is not a readable LoRA safetensors file ({exc}); re-run `bas run` to rewrite it.") from exc
    if not isinstance(meta, dict):
        raise BasError(f"{path} is not a readable LoRA safetensors file (its lora_adapter_metadata is not a table); re-run `bas run` to rewrite it.")
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_diffusers_key(key)
        if parsed is None:
            raise BasError(f"{path} holds a key bas does not know ({key}); export a LoRA written by `bas run`.")
        component, module, kind = parsed
        parts.setdefault((component, module), {})[kind] = tensor
    layers = []
    for (component, module), p in sorted(parts.items()):
        if set(p) != {"down", "up"}:
            raise BasError(f"{path} holds only one of the two factors of {component}.{module}; re-run `bas run` to rewrite it.")
        rank = p["down"].shape[0]
        alpha = meta.get(f"{component}.alpha_pattern", {}).get(module, meta.get(f"{component}.lora_alpha", rank))
        layers.append(LoraLayer(component, module, p["down"], p["up"], float(alpha)))
    return layers


def diffusers_state_dict(layers: list[LoraLayer]) -> dict[str, torch.Tensor]:
    """The keys of ``diffusers_keys``, one rank, each layer's scale folded into its up factor (see the
    module's docstring)."""
    rank = max(layer.rank for layer in layers)
    sd = {}
    for layer in (layer.padded(rank) for layer in layers):
        down, up = diffusers_keys(layer.component, layer.module)
        sd[down] = layer.down.contiguous()
        sd[up] = layer.scaled_up(layer.rank)
    return sd


def write_diffusers_lora(layers: list[LoraLayer], directory: Path) -> Path:
    """``directory/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(directory)``, replacing
    the folder as a whole."""
    if not layers:
        raise BasError("There are no LoRA layers to write.")
    with io.atomic_path(Path(directory), directory=True) as tmp:
        io.write_safetensors(tmp / DIFFUSERS_LORA_NAME, diffusers_state_dict(layers), metadata={"format": "pt"})
    return Path(directory) / DIFFUSERS_LORA_NAME


# -- kohya's layout --------------------------------------------------------------------------------
def kohya_state_dict(layers: list[LoraLayer], alpha: float, prefixes: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``lora_unet_*``/``lora_te_*`` keys with ``.lora_down.weight``, ``.lora_up.weight`` and one ``alpha``."""
    sd = {}
    for layer in layers:
        name = kohya_name(layer.component, layer.module, prefixes)
        sd[f"{name}.lora_down.weight"] = layer.down.contiguous()
        sd[f"{name}.lora_up.weight"] = layer.scaled_up(alpha)
        sd[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=layer.down.dtype)
    return sd


def kohya_model_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """``sshs_model_hash`` as kohya writes it (AUTOMATIC1111 shows it): SHA-256 of the tensor bytes of the
    file saved with only its ``ss_`` metadata."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()


def write_kohya_lora(layers: list[LoraLayer], path: Path, metadata: dict[str, str], prefixes: dict[str, str] | None = None,
                     network_dim: int | None = None) -> None:
    """The LoRA with one alpha, ``network_dim`` (the run's rank; default: the largest layer's), kohya's
    training metadata, which shows it as ``ss_network_dim``, and its model hash; ``prefixes``: the
    model family's kohya prefixes (default: SD 1.x/2.x's). A fused layer (FLUX's q, k, v as one) has
    a multiple of the rank; its scale is folded into its up factor, as every layer's is."""
    alpha = float(network_dim or max(layer.rank for layer in layers))
    tensors = {k: v.detach().cpu().contiguous() for k, v in kohya_state_dict(layers, alpha, prefixes).items()}
    metadata = {**metadata, "ss_network_module": "networks.lora", "ss_network_dim": str(int(alpha)), "ss_network_alpha": str(alpha)}
    metadata["sshs_model_hash"] = kohya_model_hash(tensors, metadata)
    io.write_safetensors(path, tensors, metadata=metadata)


# -- pipelines -------------------------------------------------------------------------------------
def save_pipeline(pipe, directory: Path) -> None:
    """``pipe.save_pretrained`` (safetensors) into ``directory``, then what transformers 4.x needs to load
    it too: text-encoder weights under their 4.x names, BPE tokenizers' ``vocab.json`` and ``merges.txt``,
    SentencePiece tokenizers' ``spiece.model`` (T5's), and tokenizer configs 4.x reads."""
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    for name, component in pipe.components.items():
        if type(component).__name__ == "CLIPTextModel":
            rename_weights(directory / name, text_encoder_module)
        if component is not None and hasattr(component, "backend_tokenizer"):
            write_slow_tokenizer_files(directory / name)


def rename_weights(folder: Path, rename) -> None:
    """Rewrite the safetensors weights of a transformers model folder (one file or shards) with
    ``rename(key)`` applied to every key."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        files = sorted(set(data["weight_map"].values()))
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
    else:
        files, data = ["model.safetensors"], None
    for name in files:
        path = folder / name
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = {rename(k): v for k, v in load_file(str(path)).items()}
        io.write_safetensors(path, tensors, metadata={"format": "pt", **metadata})
    if data is not None:
        io.write_json(index, data)


def write_slow_tokenizer_files(folder: Path) -> None:
    """What transformers 4.x's slow tokenizers read, from a tokenizer saved as ``tokenizer.json``: a BPE
    model's ``vocab.json`` and ``merges.txt`` (``CLIPTokenizer``), a Unigram model's ``spiece.model``
    (``T5Tokenizer``); and ``tokenizer_config.json`` in 4.x's terms: the added tokens (a full
    fine-tune's handles) as ``added_tokens_decoder``, 5.x's list of extra special tokens as
    ``additional_special_tokens``, without the keys that say how 5.x loaded this copy."""
    saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = saved["model"]
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):  # 4.x reads a dict there (and calls .keys() on it)
        del config["extra_special_tokens"]
        named = {config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")}
        config["additional_special_tokens"] = [t for t in extra if t not in named]
    if model.get("type") == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        with io.atomic_path(folder / "vocab.json") as tmp:
            tmp.write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        with io.atomic_path(folder / "merges.txt") as tmp:
            tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    elif model.get("type") == "Unigram":
        with io.atomic_path(folder / "spiece.model") as tmp:
            tmp.write_bytes(sentencepiece_model(saved, config.get("additional_special_tokens", [])))
    else:
        return
    for key in ("is_local", "local_files_only", "backend"):  # how this copy was loaded, 5.x's backend choice
        config.pop(key, None)
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in saved.get("added_tokens", [])}
    io.write_json(config_path, config)


def sentencepiece_model(saved: dict, extra_tokens: list[str]) -> bytes:
    """The SentencePiece model (``spiece.model``) of the Unigram model in a ``tokenizer.json``: its pieces
    and scores but the trailing ``extra_tokens`` (T5's ``<extra_id_N>``, which 4.x's ``T5Tokenizer``
    appends itself, from ``extra_ids``), its unknown piece, its normaliser's precompiled character map,
    and the word-start ``▁`` its Metaspace pre-tokeniser adds; special tokens become control pieces."""
    import base64

    from bas.core.compat import sentencepiece_model_class

    model_proto = sentencepiece_model_class()
    unigram = saved["model"]
    vocab = list(unigram["vocab"])
    extra = set(extra_tokens)
    while vocab and vocab[-1][0] in extra:
        vocab.pop()
    special = {t["content"] for t in saved.get("added_tokens", []) if t.get("special")}
    piece_type = model_proto.SentencePiece
    proto = model_proto()
    proto.trainer_spec.model_type = proto.trainer_spec.UNIGRAM
    proto.trainer_spec.vocab_size = len(vocab)
    proto.trainer_spec.unk_id = unigram.get("unk_id") or 0
    proto.trainer_spec.byte_fallback = bool(unigram.get("byte_fallback"))
    for i, (piece, score) in enumerate(vocab):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = piece_type.UNKNOWN if i == proto.trainer_spec.unk_id else piece_type.CONTROL if piece in special else piece_type.NORMAL
    normalizer = saved.get("normalizer") or {}
    charsmap = next((n["precompiled_charsmap"] for n in [normalizer, *normalizer.get("normalizers", [])] if n.get("type") == "Precompiled"), None)
    proto.normalizer_spec.name = "nmt_nfkc" if charsmap else "identity"
    if charsmap:
        proto.normalizer_spec.precompiled_charsmap = base64.b64decode(charsmap)
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()
