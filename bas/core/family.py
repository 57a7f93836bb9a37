"""Model families: the few verbs the training loop, generation and export need from a model architecture.

A family (Stable Diffusion 1.x/2.x, SDXL, ...) is a plugin: ``bas_register_model_families``
registers a :class:`ModelFamily`, which says how to recognise its pipelines, load their parts,
turn prompts into conditioning, noise latents and predict, where the attention loss reads its
maps, which diffusers pipeline generates, and how its files are exported.  The loop calls these
verbs and never asks which family it runs (as kohya's ``NetworkTrainer`` subclasses and diffusers'
per-family LoRA loaders do).

:class:`UNetFamily` implements the verbs for diffusers ``UNet2DConditionModel`` pipelines trained
with a DDPM objective (epsilon or v-prediction); the built-in ``sd`` and ``sdxl`` families extend
it.  A transformer family (FLUX.1, SD3) implements :class:`ModelFamily` directly; the hook's
docstring in :mod:`bas.core.hookspecs` lists what that takes.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from bas.core import checks
from bas.core.errors import BasError

if TYPE_CHECKING:  # pragma: no cover
    from bas.core.plugins import Plugins

MIN_ATTENTION_RES = 4  # a 2x2 map cannot hold a mask
PAPER_ATTENTION_RES = 16  # the paper's maps: 16x16, each cell 1/16 of the image's side


def default_attention_side(latent_size: int) -> float:
    """The side the loss's maps aim at when none is asked: a quarter of the latent side (16 for SD at
    512 px, 32 for SDXL at 1024 px) and never coarser than the paper's 16x16, so that a model with
    small latents (bas-mini's 16x16) still compares masks at cells of 1/16 of the side."""
    return max(latent_size / 4, PAPER_ATTENTION_RES)


@dataclass
class TextEncoder:
    """One text encoder of a pipeline and its tokenizer, under the pipeline's component names."""

    name: str  # "text_encoder", "text_encoder_2", ...
    tokenizer_name: str  # "tokenizer", "tokenizer_2", ...
    model: nn.Module
    tokenizer: Any

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length


@dataclass(frozen=True)
class LoadPlan:
    """How a run wants the parts loaded: ``quantize`` ("none", or one of the family's
    ``quantizations`` such as "nf4" and "int8") for the frozen base weights, on ``device``, with
    ``dtype`` the compute dtype of quantised layers.  ``None`` in place of a plan: unquantised,
    as every reader of a finished run (export, evaluation) loads."""

    device: torch.device
    dtype: torch.dtype
    quantize: str = "none"


@dataclass
class Components:
    """The loaded parts of a pipeline that training needs.

    ``text_encoders`` are in the pipeline's order; handles are added to every one of them.
    ``denoiser`` is the UNet or transformer, under its pipeline name ``denoiser_name``.
    """

    family: "ModelFamily"
    text_encoders: list[TextEncoder]
    denoiser: nn.Module
    vae: nn.Module
    noise_scheduler: Any
    denoiser_name: str = "unet"

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules whose parameters a run may train, by pipeline component name (checkpoints use these names)."""
        return {self.denoiser_name: self.denoiser, **{te.name: te.model for te in self.text_encoders}}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return self.family.native_resolution(self)

    # Plugins written against bas 0.1 read these; with several text encoders they are the first one.
    @property
    def unet(self) -> nn.Module:
        return self.denoiser

    @property
    def text_encoder(self) -> nn.Module:
        return self.text_encoders[0].model

    @property
    def tokenizer(self):
        return self.text_encoders[0].tokenizer


@dataclass(frozen=True)
class ImageSize:
    """Size micro-conditioning of one image, ``(height, width)`` pairs as SDXL's ``add_time_ids`` take them:
    the size of the image before it was cropped and resized, the top-left corner of the crop in the
    resized image, and the size trained or generated at.  Families that do not condition on size ignore it."""

    original: tuple[int, int]
    crop_top_left: tuple[int, int]
    target: tuple[int, int]

    @classmethod
    def plain(cls, height: int, width: int | None = None) -> "ImageSize":
        """An uncropped image generated at its own size (what diffusers' pipelines use by default)."""
        width = height if width is None else width
        return cls((height, width), (0, 0), (height, width))


@dataclass
class Conditioning:
    """What a prompt becomes for the denoiser.

    ``hidden_states`` ``(B, T, D)`` is the token sequence the denoiser attends to (SD: the text
    encoder's last hidden state; SDXL: both encoders' penultimate states concatenated); attention
    maps index its ``T`` tokens.  ``extra`` holds every other batch-first input the family's
    ``predict`` passes on (SDXL: ``text_embeds``, the pooled output of encoder 2, and
    ``time_ids``; a FLUX family: pooled projections, guidance).
    """

    hidden_states: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenated along the batch (the unconditional and conditional halves of guidance)."""
        return Conditioning(
            torch.cat([c.hidden_states for c in items]),
            {k: torch.cat([c.extra[k] for c in items]) for k in items[0].extra},
        )

    def expand(self, batch: int) -> "Conditioning":
        """The same conditioning for ``batch`` images (from a batch of 1)."""
        return Conditioning(
            self.hidden_states.expand(batch, *self.hidden_states.shape[1:]),
            {k: v.expand(batch, *v.shape[1:]) for k, v in self.extra.items()},
        )


class ModelFamily:
    """A model architecture as bas uses it.  Subclass and register an instance with
    ``bas_register_model_families`` (see :mod:`bas.core.hookspecs` for what each verb must do)."""

    name: str = ""
    description: str = ""
    default_model: str = ""
    default: bool = False  # the family of bas's default model, used when neither --model nor --family is given
    pipeline_class: str = ""  # the diffusers pipeline that generates with this family's models
    recognised_pipelines: tuple[str, ...] = ()  # model_index.json "_class_name" values this family loads
    denoiser_name: str = "unet"
    text_encoder_names: tuple[tuple[str, str], ...] = (("text_encoder", "tokenizer"),)
    sequence_encoder: int = 0  # the encoder whose token positions index the attended sequence
    resolution_multiple: int = 64
    lora_targets: dict[str, list[str] | str] = {}  # pipeline component -> peft target module names, or a regular expression
    lora_scale_argument: str = "cross_attention_kwargs"  # the pipeline/denoiser argument that scales LoRA
    export_formats: tuple[str, ...] = ("diffusers", "kohya", "lora-from-full")  # what `bas export --format` can write
    kohya_prefixes: dict[str, str] = {}  # pipeline component -> kohya key prefix ("lora_unet_", "lora_te1_", ...)
    quantizations: tuple[str, ...] = ()  # --quantize values ``load`` takes besides "none" (bitsandbytes' "nf4", "int8")
    refused_strategies: dict[str, str] = {}  # weight strategy -> why the family refuses it (the fix, in one sentence)
    schedulers: tuple[str, ...] | None = None  # `bas generate --scheduler` names the family samples with (None: every DDPM-type one)
    default_scheduler: str = "ddim"
    default_guidance: float = 7.5
    default_steps: int = 50  # sampling steps of `bas generate`, `bas edit` and `bas eval` (the paper's 50)

    def lora_target(self, component: str, module) -> list[str] | str:
        """Where LoRA goes in the pipeline component ``component`` (``module``): ``lora_targets[component]``;
        a family whose conditioning leaves some layers unread narrows it here, so that no adapter is
        trained that cannot learn (its gradient is zero) and none is saved that changes nothing."""
        return self.lora_targets[component]

    # -- recognising and loading ----------------------------------------------------------------
    def recognises(self, model_index: dict) -> bool:
        """Whether a pipeline with this ``model_index.json`` belongs to the family."""
        return model_index.get("_class_name") in self.recognised_pipelines

    def load(self, model: str, plan: LoadPlan | None = None) -> Components:
        """The parts of the pipeline at ``model``; ``plan`` (from a run) may ask for quantised base weights."""
        raise NotImplementedError  # pragma: no cover - abstract

    def native_resolution(self, components: Components) -> int:
        raise NotImplementedError  # pragma: no cover - abstract

    def prediction_type(self, noise_scheduler) -> str:
        """What the denoiser predicts, as run.json records it: the scheduler's ``prediction_type``
        (``epsilon``, ``v_prediction``), or a family's own word (``flow``)."""
        return noise_scheduler.config.prediction_type

    def check_resolution(self, resolution: int | None) -> None:
        """Refuse a training resolution the family cannot take, before anything loads."""
        step = self.resolution_multiple
        if resolution is not None and (resolution < step or resolution % step):
            raise BasError(f"--resolution must be a multiple of {step} for {self.name} models (such as {step * 8}), not {resolution}.")
        if resolution is not None:
            checks.check_side("resolution", resolution, multiple=step)  # and at most what bas takes

    def memory_defaults(self, device: torch.device, strategy: str) -> dict[str, Any]:
        """Run options (``RunConfig`` fields) to use on ``device`` where the user chose none."""
        return {}

    def check_run(self, device: torch.device, strategy: str, quantize: str) -> None:
        """Refuse, before anything loads, a weight strategy the family cannot train
        (``refused_strategies``) and a ``--quantize`` it cannot load (not among ``quantizations``,
        with a strategy that trains the base weights, or what :meth:`check_quantization` refuses)."""
        if strategy in self.refused_strategies:
            raise BasError(self.refused_strategies[strategy])
        if quantize == "none":
            return
        if quantize not in self.quantizations:
            offered = f"it takes {', '.join(self.quantizations)}" if self.quantizations else "it loads none"
            raise BasError(f"--quantize {quantize} is not a quantisation the {self.name} family loads ({offered}); use --quantize none.")
        if strategy == "full":
            raise BasError(f"--quantize {quantize} freezes the base weights, which --plugin full trains; use --plugin lora or --quantize none.")
        self.check_quantization(quantize, device)

    def check_quantization(self, quantize: str, device: torch.device) -> None:
        """Refuse, before anything loads, one of the family's ``quantizations`` that ``device`` or this
        installation cannot load (the library that quantises is the family's: bitsandbytes needs
        CUDA).  Called for training and for sampling a run trained quantised on CUDA."""

    # -- text -----------------------------------------------------------------------------------
    def conditioning(self, components: Components, input_ids: list[torch.Tensor], size: ImageSize) -> Conditioning:
        """The conditioning of tokenized prompts, ``input_ids[i]`` from text encoder ``i``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def unconditional(self, components: Components, encode: Callable[[list[str]], Conditioning]) -> Conditioning:
        """The unconditional branch of guidance for an empty negative prompt, as the family's pipeline
        makes it; ``encode(prompts)`` is the conditioning of prompts with the run's encoders."""
        return encode([""])

    # -- latents and denoising ------------------------------------------------------------------
    def scale_latents(self, vae, sample: torch.Tensor) -> torch.Tensor:
        """VAE latents as the denoiser sees them."""
        return sample * vae.config.scaling_factor

    def unscale_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return latents / vae.config.scaling_factor

    def training_noise(self, scheduler, latents: torch.Tensor, generator: torch.Generator):
        """``(noise, timesteps, noisy latents, target)`` of one training step, drawn from ``generator``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def noised(self, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``latents`` noised to ``timesteps`` with ``noise`` (the training scheduler's, or a sampling one's)."""
        return scheduler.add_noise(latents, noise, timesteps)

    def probe_timestep(self, scheduler, fraction: float, device) -> torch.Tensor:
        """The training timestep ``fraction`` of the way from clean to pure noise (the report's attention maps use 40%)."""
        return torch.tensor([int(fraction * scheduler.config.num_train_timesteps)], device=device)

    def sampling_scheduler(self, noise_scheduler) -> Any:
        """The scheduler validation samples with during training (the paper's DDIM for DDPM-type models)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(noise_scheduler.config)

    def variant_sampling(self, model: str) -> dict[str, float]:
        """Sampling defaults (``steps``, ``guidance``) where the model at ``model`` (a run's base: a folder
        or hub id) is a variant that samples otherwise than the family's defaults say (a timestep-distilled
        model in few steps); read from its files without loading weights.  None by default."""
        return {}

    def check_sampling(self, negative_prompt: str | None) -> None:
        """Refuse, before a model loads, sampling options the family's pipeline does not use."""

    def set_timesteps(self, scheduler, steps: int, device, latents: torch.Tensor) -> None:
        """Set ``steps`` sampling steps on ``scheduler`` for ``latents`` (B, C, h, w) (a flow-matching
        family shifts its schedule by the image's size)."""
        scheduler.set_timesteps(steps, device=device)

    def predict(self, denoiser: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, **kwargs) -> torch.Tensor:
        """The denoiser's prediction, spatial like ``latents`` ``(B, C, h, w)``.  It must pass
        ``cond.hidden_states`` itself (not a copy) as ``encoder_hidden_states``: the attention capture
        matches a forward pass to its step by that tensor."""
        raise NotImplementedError  # pragma: no cover - abstract

    def guided_prediction(self, denoiser: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                          uncond: Conditioning | None, guidance: float, **kwargs) -> torch.Tensor:
        """One sampling step's prediction with classifier-free guidance (``uncond`` None: none)."""
        if uncond is None:
            return self.predict(denoiser, latents, t, cond, **kwargs).float()
        pred = self.predict(denoiser, torch.cat([latents] * 2), t, Conditioning.cat([uncond, cond]), **kwargs).float()
        pred_uncond, pred_cond = pred.chunk(2)
        return pred_uncond + guidance * (pred_cond - pred_uncond)

    # -- the attention loss ---------------------------------------------------------------------
    def attention_layers(self, components: Components, latent_size: int) -> dict[str, tuple[nn.Module, int]]:
        """The attention modules whose maps of text tokens the loss may read, ``name -> (module, map side)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def attention_resolution(self, available: set[int], latent_size: int, requested: int | None = None) -> int:
        """The side of the loss's maps: ``requested``, else :func:`default_attention_side` (16 for SD at
        512 px and for bas-mini, 32 for SDXL at 1024 px) snapped to the nearest side the model has
        layers at, never below 4x4 (a 2x2 map cannot hold a mask)."""
        usable = sorted(r for r in available if r >= MIN_ATTENTION_RES)
        if requested is not None:
            if requested < MIN_ATTENTION_RES:
                raise BasError(f"--attention-res {requested} is too small to hold a mask; use one of {usable or 'none'} (at least {MIN_ATTENTION_RES}).")
            if requested not in available:
                raise BasError(f"The model has no cross-attention layers at {requested}x{requested}; set --attention-res to one of {usable or sorted(available)}.")
            return requested
        if not usable:
            raise BasError(f"The model's cross-attention maps are at most {max(available, default=0)}x{max(available, default=0)} at this resolution, "
                           f"too small for a mask; train at a higher --resolution.")
        target = default_attention_side(latent_size)
        return min(usable, key=lambda r: (abs(math.log(r / target)), -r))

    def capture_processor(self, store) -> Any:
        """An attention processor for the modules of :meth:`attention_layers` that computes their
        output as usual and appends each forward's head-averaged probabilities ``(B, Q, T)`` (fp32)
        to ``store`` (:class:`bas.core.attention.AttentionStore`)."""
        raise NotImplementedError  # pragma: no cover - abstract

    # -- pipelines, generation and files --------------------------------------------------------
    def pipeline_from_components(self, components: Components, scheduler) -> Any:
        """The family's diffusers pipeline around a run's parts (class images, a full fine-tune's ``pipeline/``)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def load_pipeline(self, model: str, device: torch.device, dtype: torch.dtype, quantize: str = "none") -> Any:
        """The family's diffusers pipeline on ``device``; ``quantize`` is the run's ``--quantize`` where the
        device takes it (a frozen base the run trained quantised is sampled quantised too)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def pipeline_text_encoders(self, pipe) -> list[TextEncoder]:
        """A loaded pipeline's text encoders, in the order of ``text_encoder_names``."""
        return [TextEncoder(name, tok, getattr(pipe, name), getattr(pipe, tok)) for name, tok in self.text_encoder_names]

    def prompt_conditioning(self, pipe, prompt: str, negative_prompt: str | None, guided: bool, lora_scale: float | None,
                            size: ImageSize) -> tuple[Conditioning, Conditioning | None]:
        """(conditional, unconditional or None) for sampling with a loaded pipeline, as its ``__call__`` makes them."""
        raise NotImplementedError  # pragma: no cover - abstract

    def kohya_base(self, info: dict) -> dict[str, Any]:
        """What a kohya LoRA's metadata says of a run's base model (``info`` is run.json with
        ``handle_dim``, the first encoder's width): ``version`` (``ss_base_model_version``), ``v2``
        (``ss_v2``), ``architecture`` (``modelspec.architecture``), ``resolution`` (when the run has
        none) and ``label`` (for people)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def kohya_layers(self, layers: list) -> list:
        """A LoRA's layers (:class:`bas.exports.formats.LoraLayer`) as kohya's scripts name and shape them for
        this family (FLUX fuses q/k/v into one layer); SD and SDXL keep diffusers' modules."""
        return layers

    # A handle as files other tools load, from its rows ``{encoder name: tensor[D_i]}``.  These
    # defaults are for one text encoder; a family with several defines its own layout.
    def textual_inversion(self, token: str, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A textual-inversion file for diffusers' ``load_textual_inversion``: ``{token: tensor[D]}``."""
        (row,) = rows.values()
        return {token: row.float()}

    def webui_embedding(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An embedding file as AUTOMATIC1111 and ComfyUI read it (the file name is the word): ``{"emb_params": tensor[1, D]}``."""
        (row,) = rows.values()
        return {"emb_params": row.float()[None]}

    def textual_inversion_code(self, files: list[tuple[str, str]]) -> list[str]:
        """Python lines that load textual-inversion files ``[(token, path), ...]`` into ``pipe``."""
        paths = ", ".join(python_str(path) for _, path in files)
        return [f"pipe.load_textual_inversion([{paths}])"]

    def tiny_pipeline(self, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16) -> Any:
        """A tiny random pipeline of this family for offline tests (``bas tiny-model --family NAME``),
        ``sample_size`` latent cells a side."""
        raise NotImplementedError  # pragma: no cover - abstract


class UNetFamily(ModelFamily):
    """A diffusers ``UNet2DConditionModel`` + ``AutoencoderKL`` pipeline trained with the DDPM objective.

    ``component_classes`` names the class of each part, ``(library, class)``; the training noise
    schedule is the pipeline's scheduler config read as ``DDPMScheduler``.
    """

    component_classes: dict[str, tuple[str, str]] = {}
    pipeline_kwargs: dict[str, Any] = {}  # passed to the pipeline's constructor and from_pretrained

    def load(self, model: str, plan: LoadPlan | None = None) -> Components:
        from diffusers import DDPMScheduler

        check_model_path(model)
        parts = {}
        try:
            for name, (library, cls) in self.component_classes.items():
                parts[name] = getattr(importlib.import_module(library), cls).from_pretrained(model, subfolder=name)
            noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        except MODEL_FILE_ERRORS as exc:
            raise load_error(model, exc) from exc
        if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise BasError(f"Model '{model}' predicts '{noise_scheduler.config.prediction_type}'; bas supports epsilon and "
                           f"v-prediction {self.name} models.")
        encoders = [TextEncoder(name, tok, parts[name], parts[tok]) for name, tok in self.text_encoder_names]
        return Components(self, encoders, parts[self.denoiser_name], parts["vae"], noise_scheduler, self.denoiser_name)

    def native_resolution(self, components: Components) -> int:
        size = components.denoiser.config.sample_size
        return (size if isinstance(size, int) else size[0]) * components.vae_scale_factor

    def training_noise(self, scheduler, latents, generator):
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
        noisy = scheduler.add_noise(latents, noise, t)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        return noise, t, noisy, target

    def added_cond_kwargs(self, cond: Conditioning) -> dict:
        """The UNet's ``added_cond_kwargs`` (SDXL's pooled text and time ids); none by default."""
        return {}

    def predict(self, denoiser, latents, timesteps, cond, **kwargs):
        # not denoiser.dtype: diffusers walks every module for it, milliseconds per step with LoRA
        dtype = next(denoiser.parameters()).dtype
        extra = self.added_cond_kwargs(cond)
        if extra:
            kwargs["added_cond_kwargs"] = extra
        return denoiser(latents.to(dtype), timesteps, encoder_hidden_states=cond.hidden_states, **kwargs).sample

    def attention_layers(self, components, latent_size):
        """Every cross-attention module (``attn2``) of the down and up blocks with the side it runs at
        (the mid block is not used by the paper's loss)."""
        unet = components.denoiser
        n = len(unet.config.block_out_channels)
        layers = {}
        for name, module in unet.named_modules():
            if not name.endswith("attn2"):
                continue
            parts = name.split(".")
            if parts[0] == "down_blocks":
                level = int(parts[1])
            elif parts[0] == "up_blocks":
                level = n - 1 - int(parts[1])
            else:
                continue
            layers[name] = (module, latent_size // 2**level)
        return layers

    def capture_processor(self, store):
        from bas.core.attention import CaptureCrossAttention

        return CaptureCrossAttention(store)

    def pipeline_from_components(self, components, scheduler):
        import diffusers

        parts = {te.name: te.model for te in components.text_encoders}
        parts.update({te.tokenizer_name: te.tokenizer for te in components.text_encoders})
        return getattr(diffusers, self.pipeline_class)(
            vae=components.vae, **{components.denoiser_name: components.denoiser}, scheduler=scheduler, **parts, **self.pipeline_kwargs,
        )

    def load_pipeline(self, model, device, dtype, quantize="none"):
        import diffusers

        from bas.core.compat import diffusers_dtype

        check_model_path(model)
        try:
            pipe = getattr(diffusers, self.pipeline_class).from_pretrained(model, **diffusers_dtype(dtype), **self.pipeline_kwargs)
        except MODEL_FILE_ERRORS as exc:
            raise load_error(model, exc) from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)


def python_str(value) -> str:
    """``value`` as a Python string literal for the code a model card shows (a path with a quote or a
    backslash stays one string): JSON's double-quoted form, which Python reads the same."""
    return json.dumps(str(value), ensure_ascii=False)


# -- finding a model's family --------------------------------------------------------------------
_MODEL_OF_RUN: contextvars.ContextVar[Path | None] = contextvars.ContextVar("bas_model_of_run", default=None)


@contextlib.contextmanager
def model_of_run(out: Path):
    """While a command loads the base model a run's run.json names (generate, edit, export, eval, none of
    which takes --model): a message about that model names the run and how to fix it there."""
    token = _MODEL_OF_RUN.set(Path(out))
    try:
        yield
    finally:
        _MODEL_OF_RUN.reset(token)


def model_fix(option_fix: str, run_fix: str = "put the model the run was made with back at that path") -> str:
    """How to fix a model that cannot be used: ``option_fix`` (what to pass with --model), or, where the
    model is a run's (:func:`model_of_run`), ``run_fix`` or a new run."""
    run = _MODEL_OF_RUN.get()
    if run is None:
        return option_fix
    return f"the run {run} was made with it (its run.json's \"model\"): {run_fix}, or re-run `bas run` with a model that loads"


def plugin_model_error(model: str) -> BasError | None:
    """For a model name that an installed plugin gives a folder (``bas-mini``) where that plugin is off:
    the one line saying so, before the name is taken for a hub id; None for any other model."""
    if Path(model).exists():
        return None
    from bas.core.plugins import Plugins

    every = Plugins(all_installed=True, tolerant=True)
    found = [plugin for plugin, folder in every.call_each("bas_model_path", name=model) if folder is not None]
    if not found:
        return None
    plugin = found[0]
    if every.infos[plugin].default:  # on unless turned off
        return BasError(f"Model '{model}' is provided by the {plugin} plugin, which --plugin no:{plugin} turned off; "
                        f"leave out --plugin no:{plugin} to use {model}, or pass another --model.")
    return BasError(f"Model '{model}' is provided by the {plugin} plugin, which is not turned on; add --plugin {plugin}, or pass another --model.")


def check_model_path(model: str) -> None:
    """Refuse, before anything is read from it, a ``--model`` folder that is no pipeline or that leads
    out of itself (:func:`check_model_files`), and a plugin's model name where that plugin is off
    (it is no hub id); every loader of every family calls this first."""
    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise BasError(f"{model} is not a diffusers pipeline folder (it has no model_index.json); "
                       f"{model_fix('pass a pipeline folder or hub id with --model')}.")
    error = plugin_model_error(model)
    if error is not None:
        raise error
    check_model_files(model)


def model_files_root(model: str) -> tuple[Path, Path] | None:
    """``(folder the loaders read, root every file read must resolve inside)`` for ``model``: a local
    folder and itself (a link given as ``--model`` counts as the folder it names); for a hub id in the
    Hugging Face cache its snapshot and the cache root (snapshots link into the cache's ``blobs/``);
    ``None`` for a hub id not cached (the hub client writes it afresh)."""
    path = Path(model)
    if path.exists():
        real = path.resolve()
        return real, real
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = [try_to_load_from_cache(model, name) for name in ("model_index.json", "config.json")]  # a pipeline, or one model
    except Exception:  # not a valid hub id: the loader names it
        return None
    cached = [c for c in cached if isinstance(c, str)]
    return (Path(cached[0]).parent, Path(constants.HF_HUB_CACHE).resolve()) if cached else None


def check_model_files(model: str) -> None:
    """One rule for every file bas reads from a model folder (as for run, scene and export folders):
    it resolves inside that folder, or inside the Hugging Face cache for a hub id.  Refuses a link
    that leads elsewhere, a ``model_index.json`` part or a sharded weights index naming a path
    outside the folder, with one line naming the file."""
    from bas.core import io

    found = model_files_root(model)
    if found is None:
        return
    folder, root = found
    for link in io.links_under(folder):
        target = link.resolve()
        if target != root and root not in target.parents:
            raise BasError(f"Model folder {model} holds the link {link.relative_to(folder).as_posix()}, which leads outside it (to {target}); "
                           "bas reads no model file from outside its folder: copy the file into the folder in the link's place "
                           "(`cp --remove-destination TARGET LINK`) or " + model_fix("pass the folder it lives in with --model", "restore the folder") + ".")
    named = []  # (file, path it names relative to the file's folder)
    index = folder / "model_index.json"
    try:
        parts = json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError):
        parts = {}  # the loader says why it cannot be read
    if isinstance(parts, dict):  # each part's subfolder, by its key
        named += [(index, name) for name, value in parts.items() if not name.startswith("_") and isinstance(value, list)]
    for shards in sorted(folder.rglob("*.index.json")):  # sharded weights: the index names each shard's file
        try:
            weight_map = json.loads(shards.read_text()).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            continue
        named += [(shards, str(name)) for name in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else ())]
    for file, name in named:
        try:
            io.inside(file.parent, name, str(file))
        except BasError:
            raise BasError(f"Model folder {model}'s {file.relative_to(folder).as_posix()} names {name!r}, a path outside the folder; "
                           "bas reads no model file from outside its folder: "
                           + model_fix("download the model again and pass that folder with --model", "download the model again into that folder") + ".") from None


# what loading a model raises for a missing, damaged or refused file: torch's weights-only unpickler
# refuses pickled code (UnpicklingError) and trips over damaged pickles (KeyError, EOFError)
MODEL_FILE_ERRORS = (OSError, ValueError, pickle.UnpicklingError, KeyError, EOFError)


def load_error(model: str, exc: Exception) -> BasError:
    if isinstance(exc, (pickle.UnpicklingError, KeyError, EOFError)):  # torch's own advice (weights_only=False) would run its code
        why = "pickled weights that could run code" if isinstance(exc, pickle.UnpicklingError) else "a damaged pickle"
        fix = model_fix("so pass a model saved as safetensors with --model (or download it again if it is damaged)",
                        "download it again if it is damaged")
        return BasError(f"Model '{model}' holds a weights file that cannot be read safely ({why}); bas never runs code from weights, {fix}.")
    return BasError(
        f"Could not load model '{model}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
        + model_fix("check the hub id and your connection (or `hf auth login`), or pass a local diffusers folder with --model",
                    "check your connection (or `hf auth login`), or put the model the run was made with back at that path") + "."
    )


def read_model_index(model: str) -> dict:
    """A pipeline's ``model_index.json``: from the folder, or for a hub id just that file (cached by the hub client)."""
    check_model_path(model)
    path = Path(model) / "model_index.json"
    try:
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "model_index.json"))
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        fix = model_fix("pass an unmodified diffusers pipeline with --model", "download the model again into that folder")
        raise BasError(f"{path} is not valid JSON ({exc}); {fix}.") from exc
    except Exception as exc:  # the hub client raises many kinds: offline, not found, gated, bad id
        raise load_error(model, exc) from exc


def known_model_file(model: str, name: str) -> dict | None:
    """A pipeline's JSON file ``name`` (``model_index.json``, ``transformer/config.json``) where it is
    at hand without a download: in the folder, or for a hub id the copy the hub client cached;
    ``None`` where there is none (or it cannot be read: the loader then says why)."""
    path = Path(model) / name
    if not path.is_file():
        if Path(model).exists():
            return None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, name)
        except Exception:  # not a valid hub id: the loader names it
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_family_matches(plugins: "Plugins", family: ModelFamily, model: str) -> None:
    """Refuse, before any weight loads, a ``--family`` whose pipelines ``model`` is not, where its
    ``model_index.json`` names a pipeline another family loads.  A pipeline no family recognises
    may still be loaded as the family named (that is what ``--family`` is for)."""
    index = known_model_file(model, "model_index.json")
    if index is None or family.recognises(index):
        return
    owners = sorted(f.name for f in model_families(plugins).values() if f.recognises(index))
    if owners:
        raise BasError(f"--family {family.name} does not match {model}: its model_index.json names a {index.get('_class_name')}, "
                       f"which the {owners[0]} family loads; pass --family {owners[0]} or leave --family out.")


def model_families(plugins: "Plugins") -> dict[str, ModelFamily]:
    """Every model family the enabled plugins register, by name."""
    return {e.name: e.factory() for e in plugins.registry("model family").entries.values()}


def get_family(plugins: "Plugins", name: str) -> ModelFamily:
    families = model_families(plugins)
    if name not in families:
        raise BasError(f"Unknown model family '{name}'; choose one of: {', '.join(sorted(families)) or 'none'} "
                       "(or turn on a plugin that adds it with --plugin).")
    return families[name]


def default_family(plugins: "Plugins") -> ModelFamily:
    """The family of bas's default model (the paper's)."""
    found = [f for f in model_families(plugins).values() if f.default]
    if len(found) != 1:
        raise BasError("No default model family is enabled; pass --model and --family (see `bas plugins`).")
    return found[0]


def detect_family(plugins: "Plugins", model: str) -> ModelFamily:
    """The one family that recognises the pipeline at ``model`` (a folder or hub id, already resolved)."""
    index = read_model_index(model)
    families = model_families(plugins)
    found = [f for f in families.values() if f.recognises(index)]
    names = ", ".join(sorted(families)) or "none"
    if not found:
        kind = index.get("_class_name", "an unnamed pipeline")
        raise BasError(f"{model} is a {kind}, which no model family knows (families: {names}); "
                       "pass --family NAME to load it as one of them, or turn on a plugin that adds its family.")
    if len(found) > 1:
        raise BasError(f"{model} is recognised by the families {', '.join(sorted(f.name for f in found))}; pick one with --family.")
    return found[0]


def choose_family(plugins: "Plugins", model: str | None, requested: str | None) -> ModelFamily:
    """``--family`` if given, else the family of ``--model``, else the default family."""
    if model:
        check_model_files(model)  # before its model_index.json (or, for the memory plan, any config) is read
    if requested:
        family = get_family(plugins, requested)
        if model:
            check_family_matches(plugins, family, model)
        return family
    if model:
        return detect_family(plugins, model)
    return default_family(plugins)
