"""A run's modules built from their config files alone, as fake tensors: shapes, dtypes, no weights.

The config files come from a local pipeline folder, from the copies of four published pipelines'
configs shipped in ``bas/memory/configs`` (see its README for where each value comes from), or for
another hub id from the hub (config files only: ``model_index.json``, each part's ``config.json``,
the scheduler's and tokenizers' configs).  Tokenizers are stand-ins that give prompts the
tokenizer's length; bitsandbytes' quantised layers are stand-ins with their storage and their
dequantised weight only while they compute.
"""

from __future__ import annotations

import importlib
import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from bas.core.errors import BasError
from bas.core.family import Components, TextEncoder, UNetFamily, load_error

CONFIGS = Path(__file__).parent / "configs"
# published pipelines whose config files ship with bas (bas/memory/configs/README.md cites them)
PACKAGED = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1-base": "sd21-base",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base",
    "black-forest-labs/FLUX.1-dev": "flux1-dev",
}
CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}


def packaged_folder(model: str) -> Path | None:
    return CONFIGS / PACKAGED[model] if model in PACKAGED else None


def config_reader(model: str):
    """``read(relative path) -> dict or None`` over a pipeline's config files."""
    folder = packaged_folder(model) or (Path(model) if Path(model).exists() else None)
    if folder is not None:

        def read(name: str):
            path = folder / name
            return json.loads(path.read_text()) if path.is_file() else None

        return read

    def read_hub(name: str):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return json.loads(Path(hf_hub_download(model, name)).read_text())
        except EntryNotFoundError:
            return None
        except Exception as exc:  # offline, not found, gated
            raise load_error(model, exc) from exc

    return read_hub


class PlanTokenizer:
    """What a run asks of a tokenizer, without its vocabulary: prompts become ``model_max_length`` ids,
    each word one id, handles new ids at the end."""

    def __init__(self, size: int, model_max_length: int, bos: int | None, eos: int, pad: int):
        self.size, self.model_max_length = size, model_max_length
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad
        self.added: dict[str, int] = {}

    def __len__(self) -> int:
        return self.size + len(self.added)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.added)

    def _word(self, word: str) -> int:
        if word in self.added:
            return self.added[word]
        return 3 + zlib.crc32(word.encode()) % max(self.size - 3, 1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._word(w) for w in text.split()]
        return (
            ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else [])
            + ids
            + ([self.eos_token_id] if add_special_tokens else [])
        )

    def add_tokens(self, tokens) -> int:
        for token in tokens:
            self.added.setdefault(token, len(self))
        return len(tokens)

    def convert_tokens_to_ids(self, tokens):
        return [self.added[t] for t in tokens] if isinstance(tokens, list) else self.added[tokens]

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="pt", **_):
        length = max_length or self.model_max_length
        rows = []
        for prompt in [prompts] if isinstance(prompts, str) else prompts:
            ids = self.encode(prompt)[:length]
            rows.append(ids + [self.pad_token_id] * (length - len(ids)))
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # real ids, as a tokenizer's: the run reads where its handles are
            return SimpleNamespace(input_ids=torch.tensor(rows))


def plan_tokenizer(read, name: str, encoder_config) -> PlanTokenizer:
    config = read(f"{name}/{CONFIG_FILES['tokenizer']}") or {}
    t5 = getattr(encoder_config, "model_type", "") in ("t5", "umt5")
    length = config.get("model_max_length") or (512 if t5 else 77)
    length = 512 if length > 100_000 else int(length)
    size = encoder_config.vocab_size
    if t5:
        return PlanTokenizer(size, length, None, 1, 0)
    return PlanTokenizer(size, length, encoder_config.bos_token_id, encoder_config.eos_token_id, encoder_config.pad_token_id or 0)


class _DequantizedLinear(torch.autograd.Function):
    """bitsandbytes' 4-/8-bit matmul as memory sees it: the weight dequantised for the product and for the
    input's gradient, kept for neither (bitsandbytes saves no input when the weight does not train)."""

    @staticmethod
    def forward(ctx, x, bias, out_features: int, in_features: int):
        ctx.shape = (out_features, in_features)
        return F.linear(x, x.new_empty(out_features, in_features), bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ grad.new_empty(*ctx.shape), None, None, None


class PlannedQuantizedLinear(nn.Linear):
    """A frozen linear layer loaded by bitsandbytes: nf4 holds half a byte per weight and an fp32 absmax per
    64 (``bnb_4bit_use_double_quant`` off, as bas loads), int8 a byte per weight and an fp32 scale per row."""

    def __init__(self, linear: nn.Linear, quantize: str, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n = self.in_features * self.out_features
        packed, stats = ((n + 1) // 2, (n + 63) // 64) if quantize == "nf4" else (n, self.out_features)
        self.weight = nn.Parameter(torch.empty(packed, 1, dtype=torch.uint8, device="meta"), requires_grad=False)
        self.register_buffer("quant_stats", torch.empty(stats, dtype=torch.float32, device="meta"))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.compute_dtype = dtype

    def forward(self, x):
        return _DequantizedLinear.apply(x.to(self.compute_dtype), self.bias, self.out_features, self.in_features)


def quantize_linears(model: nn.Module, quantize: str, dtype: torch.dtype) -> None:
    """Every ``nn.Linear`` as bitsandbytes' quantised layer, the other weights in ``dtype`` (what
    ``from_pretrained(quantization_config=..., dtype=dtype)`` loads)."""
    model.to(dtype)
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, PlannedQuantizedLinear(child, quantize, dtype))
    model.is_quantized = True


def build(read, name: str, entry):
    """The pipeline part ``name`` on the meta device from its config."""
    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name)
    if library == "diffusers":
        config = read(f"{name}/config.json")
        if config is None:
            raise BasError(f"The pipeline has no {name}/config.json; pass an unmodified diffusers pipeline with --model.")
        with torch.device("meta"):
            return cls.from_config(config)
    config = read(f"{name}/config.json")
    if config is None:
        raise BasError(f"The pipeline has no {name}/config.json; pass an unmodified diffusers pipeline with --model.")
    config_class = cls.config_class
    config = config_class.from_dict({k: v for k, v in config.items() if k not in ("architectures",)})
    with torch.device("meta"):
        return cls(config)


def fake_components(family, model: str, fake, quantize: str, dtype: torch.dtype) -> tuple[Components, list[nn.Module]]:
    """The family's parts of ``model`` as fake tensors (``fake(meta tensor)`` makes one), and the modules
    that load straight onto the device (bitsandbytes quantises while it places the weights)."""
    read = config_reader(model)
    index = read("model_index.json")
    if index is None:
        raise BasError(f"{model} has no model_index.json; pass a diffusers pipeline folder or hub id with --model.")
    needed = [family.denoiser_name, "vae", *(name for name, _ in family.text_encoder_names)]
    missing = [n for n in needed + ["scheduler"] if not isinstance(index.get(n), list) or index[n][0] is None]
    if missing:
        raise BasError(f"{model}'s model_index.json has no {missing[0]}; pass a {family.name} pipeline with --model.")
    parts = {name: build(read, name, index[name]).eval() for name in needed}  # as from_pretrained leaves them: dropout off
    on_device = []
    if quantize != "none":
        for name in (family.denoiser_name, *(n for n, _ in family.text_encoder_names)):
            if name == family.denoiser_name or getattr(parts[name].config, "model_type", "") == "t5":  # what the family quantises
                quantize_linears(parts[name], quantize, dtype)
                on_device.append(parts[name])
    for module in parts.values():
        module._apply(fake)
    scheduler_config = read(f"scheduler/{CONFIG_FILES['scheduler']}") or {}
    library, class_name = index["scheduler"]
    if isinstance(family, UNetFamily):
        library, class_name = "diffusers", "DDPMScheduler"  # as UNet families train
    scheduler = getattr(importlib.import_module(library), class_name).from_config(scheduler_config)
    encoders = [TextEncoder(name, tok, parts[name], plan_tokenizer(read, tok, parts[name].config)) for name, tok in family.text_encoder_names]
    return Components(family, encoders, parts[family.denoiser_name], parts["vae"], scheduler, family.denoiser_name), on_device
