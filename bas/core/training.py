"""The two-phase schedule: phase 1 trains the handles only, phase 2 the weight strategy's weights too.

Everything swappable (mask source, weight strategy, loss terms, optimizer, concept sampler,
observers) is resolved once from the plugins in :func:`resolve`; the step loop then calls those
plain objects.  This module knows no particular loss, mask source or weight strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from bas.core.version import __version__
from bas.core import checkpoint, checks, io, run_inputs, runfolder
from bas.core.components import LossTerm, StepBatch, StepRecord, WeightStrategy
from bas.core.errors import BasError, PluginError
from bas.core.failures import is_out_of_memory
from bas.core.family import Components, Conditioning, ImageSize, LoadPlan, choose_family
from bas.core.handles import HandleEmbedding, add_handles, check_init_words, handles_file_state
from bas.core.model import DTYPES, place, resolve_device, resolve_model, resolve_precision
from bas.core.masks import load_scene_input
from bas.core.plugins import Plugins
from bas.core.runs import PROMPT_PREFIX
from bas.core.scene import Scene, check_concept_count, prepare_scene, scene_fingerprint

# Run options a model family may choose where the user did not (None), and their values otherwise.
FAMILY_CHOOSES = {"gradient_checkpointing": False, "optimizer": "adamw", "quantize": "none"}
QUANTIZE = ("none", "nf4", "int8")


@dataclass
class RunConfig:
    """Options of one extraction.  Plugin options live in ``options`` under their click names."""

    out: Path
    model: str | None = None  # None: the family's default model (the paper's, SD 2.1 base, without --family)
    family: str | None = None  # None: detected from the model
    image: Path | None = None
    plugins: list[str] = field(default_factory=list)
    phase1_steps: int = 400
    phase2_steps: int = 400
    phase1_lr: float = 5e-4
    phase2_lr: float | None = None  # None: the weight strategy's default
    phase2_handle_lr: float = 2e-6  # the handles' own rate in phase 2 (the reference code's), whatever the weights
    seed: int = 0
    resolution: int | None = None  # None: the model's native resolution
    init_tokens: list[str] = field(default_factory=list)
    optimizer: str | None = None  # None: adamw, or what the family picks for the device
    precision: str = "auto"
    gradient_checkpointing: bool | None = None  # None: off, or what the family picks for the device
    quantize: str | None = None  # None: none, or what the family picks for the device (FLUX on CUDA: nf4)
    device: str = "auto"
    flip_p: float = 0.5
    max_grad_norm: float = 1.0
    overwrite: bool = False
    resume: bool = False
    background: bool = False  # one more handle for the complement of all masks
    model_defaults: bool = True  # the model's recommended settings (bas_model_settings) where the user chose none
    options: dict[str, Any] = field(default_factory=dict)
    model_settings: dict[str, Any] = field(default_factory=dict)  # those it took (bas.core.api.make_config), for run.json

    def check(self) -> None:
        """Every check of the options that needs no model, plugin options' numbers included."""
        for name in ("phase1_steps", "phase2_steps"):
            checks.check_integer(name, getattr(self, name), 0)
        if self.phase1_steps + self.phase2_steps == 0:
            raise BasError("Both phases have 0 steps; give --phase1-steps or --phase2-steps a positive number.")
        for name in ("phase1_lr", "phase2_lr", "phase2_handle_lr"):
            if getattr(self, name) is not None:
                checks.check_positive(name, getattr(self, name))
        checks.check_seed(self.seed)
        if self.resolution is not None:  # the model family checks the multiples it can take (before any model loads)
            checks.check_integer("resolution", self.resolution, 1)
            if self.resolution > checks.MAX_SIDE:
                raise BasError(f"--resolution must be at most {checks.MAX_SIDE} pixels, not {self.resolution}.")
        checks.check_finite("flip_p", self.flip_p)
        if not 0.0 <= self.flip_p <= 1.0:
            raise BasError(f"--flip-p must be between 0 and 1, not {self.flip_p}.")
        checks.check_finite("max_grad_norm", self.max_grad_norm)
        if self.max_grad_norm < 0:
            raise BasError(f"--max-grad-norm must be 0 (off) or positive, not {self.max_grad_norm}.")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise BasError(f"Unknown --quantize {self.quantize!r}; use one of {', '.join(QUANTIZE)}.")
        for word in self.init_tokens:
            if not str(word).strip():
                raise BasError("An --init-token is empty; give a plain word such as 'dog'.")
            if len(str(word).split()) != 1:  # a handle starts from one token's embedding
                raise BasError(f"--init-token '{word}' is not one word; give a single word such as 'bear'.")
        check_init_words(self.init_tokens)
        checks.check_all_finite(self.options)

    def to_json(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        data["image"] = str(self.image) if self.image else None
        return data


@dataclass
class Resolved:
    """The components chosen for a run, resolved once from the plugins."""

    mask_source: Any
    strategy: WeightStrategy
    strategy_name: str
    loss_terms: list[LossTerm]
    optimizer_factory: Callable | None  # set once the family has had its say on --optimizer
    sampler: Callable[[random.Random], list[int]] | None
    observers: list[Any]


def resolve(plugins: Plugins, config: RunConfig, num_concepts: int | None = None) -> Resolved:
    source = plugins.choose("mask source")
    strategy_entry = plugins.choose("weight strategy")
    made = [(e.plugin, e.factory(config)) for e in plugins.registry("loss term").entries.values()]
    terms = [t for _, t in made if t is not None]
    if not terms:
        raise BasError("No loss term is enabled; do not block masked-loss, or turn on a plugin that provides a loss.")
    strategy = strategy_entry.factory(config)
    if not getattr(strategy, "freezes_base", True):
        lacking = sorted({plugin for plugin, t in made if t is not None and getattr(t, "needs_adapters", False)})
        if lacking:
            raise BasError(adapters_message(lacking, strategy_entry.name))
    observers = [o for o in (e.factory(config) for e in plugins.registry("observer").entries.values()) if o is not None]
    return Resolved(
        mask_source=source.factory(config),
        strategy=strategy,
        strategy_name=strategy_entry.name,
        loss_terms=terms,
        optimizer_factory=None,
        sampler=None,
        observers=observers,
    )


def adapters_message(plugins: list[str], strategy: str) -> str:
    """The refusal of loss terms that need adapters (``needs_adapters``) under a weight strategy without them."""
    names = " and ".join(plugins)
    off = " ".join(f"--plugin no:{p}" for p in plugins)
    return (f"Plugin {names} asks the base model beside the adapted one, so it needs an adapter weight strategy (lora), and "
            f"'{strategy}' fine-tunes the base model itself; drop --plugin {strategy}, or turn it off with {off}.")


def adapter_conflicts(plugins: Plugins) -> list[str]:
    """The enabled plugins whose loss terms need adapters (``LossTerm.needs_adapters``, read from the registered
    class) that the weight strategy ``plugins`` chooses does not add (``freezes_base``): what :func:`resolve`
    would refuse, known before any option is read.  Empty when the run can go."""
    if getattr(plugins.choose("weight strategy").factory, "freezes_base", True):
        return []
    entries = plugins.registry("loss term").entries.values()
    return sorted({e.plugin for e in entries if getattr(e.factory, "needs_adapters", False)})


def _observer_calls(observers: list[Any], name: str) -> list[Callable]:
    return [getattr(o, name) for o in observers if hasattr(o, name)]


class Interrupted(BasError):
    """Ctrl-C during training: a checkpoint was saved and the message says how to resume."""


class NumericalError(BasError):
    """The loss stopped being finite."""


@dataclass
class PhaseState:
    """The live state of the phase being trained, what a checkpoint captures."""

    phase: int
    step: int
    optimizer: Any
    scaler: Any
    params: list[torch.nn.Parameter]


def bas_defaults(plugins=None) -> dict:
    """bas's own value of every option (``options.NAME`` for the plugins' in ``plugins``): what a run has where
    neither the user nor the model's recommended settings give one; as JSON has them."""
    from bas.core.plugins import option_default

    values = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    if plugins is not None:
        values.update({f"options.{opt.name}": option_default(opt) for _, opt in plugins.run_options()})
    return json.loads(json.dumps(values, default=str))


class Run:
    """The state of one extraction: model parts, handles, cached inputs, history."""

    planning = False  # True in a memory plan (bas.memory.plan): tensors are fake, so plugins read no values and write nothing

    def __init__(self, config: RunConfig, plugins: Plugins):
        config.check()
        missing = [n for n in config.model_settings.get("plugins", ()) if n not in plugins.infos]
        if missing:  # a caller's mistake, not the user's: the run would go without what its run.json says it ran
            raise PluginError(f"The run's plugins lack {', '.join(missing)}, which {config.model} recommends; make them with "
                              "bas.core.api.run_plugins.")
        self.config = config
        self.plugins = plugins
        self.out = Path(config.out)
        self.device = self.resolve_device()
        self.resolved = resolve(plugins, config)  # every plugin checks its options here
        # the family (from --family, else --model's model_index.json) and its choices, before any model loads;
        # config keeps what was asked for (run.json, --resume), the run what it uses
        self.family = choose_family(plugins, resolve_model(config.model, plugins) if config.model else None, config.family)
        self.model = config.model or self.family.default_model
        self.family.check_resolution(config.resolution)
        self.family_defaults = self._family_choices(self.resolved.strategy_name)
        self.optimizer_name = self.choice("optimizer")
        self.gradient_checkpointing = self.choice("gradient_checkpointing")
        self.quantize = self.choice("quantize")
        self.family.check_run(self.device, self.resolved.strategy_name, self.quantize)
        self.resolved.optimizer_factory = plugins.registry("optimizer").get(self.optimizer_name, "--optimizer").factory
        check_optimizer = getattr(self.resolved.optimizer_factory, "check", None)  # what the optimizer needs of the device
        if check_optimizer is not None:
            check_optimizer(config, self.device)
        self.history: dict[str, list[dict]] = {"phase1": [], "phase2": []}
        self.times: dict[str, float] = {}
        self.precision = self.resolve_precision()
        self.dtype = DTYPES[self.precision]
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator(self.generator_device()).manual_seed(config.seed)
        self.phase = 0
        self.current: PhaseState | None = None
        self.resume_from: checkpoint.Checkpoint | None = None
        self._stop_requested = False

    # The device the run is for, its precision and its random generator's device: this machine's --device.
    # A memory plan (bas.memory) overrides them to plan for a device this machine may not have.
    def resolve_device(self) -> torch.device:
        return resolve_device(self.config.device)

    def resolve_precision(self) -> str:
        return resolve_precision(self.config.precision, self.device)

    def generator_device(self) -> torch.device:
        return self.device

    def _family_choices(self, strategy: str) -> dict[str, Any]:
        """The family's choices for this device among the options the user left open."""
        return {name: value for name, value in self.family.memory_defaults(self.device, strategy).items()
                if name in FAMILY_CHOOSES and getattr(self.config, name) is None}

    def choice(self, name: str) -> Any:
        """An option the family may choose: the user's value, else the family's, else bas's default."""
        value = getattr(self.config, name)
        return value if value is not None else self.family_defaults.get(name, FAMILY_CHOOSES[name])

    @property
    def handle_embedding(self) -> HandleEmbedding:
        """The first text encoder's handle embedding (plugins written against bas 0.1 read this)."""
        return self.handle_embeddings[0]

    # -- setup --------------------------------------------------------------------------------
    def check_out(self) -> None:
        """Lock --out and decide what this run may do there, before anything slow happens.

        The run then works in the staging folder beside --out (``self.out``), and only a complete
        run replaces --out (:mod:`bas.core.runfolder`).  A finished or interrupted run is replaced
        only with --overwrite, a folder that is not a run never; --resume finds the checkpoint.
        """
        runfolder.check_target(self.config.out, input_paths(self.config, self.plugins))
        folder = self.folder = runfolder.RunFolder(self.config.out)
        folder.open()
        try:
            shown = self.config.out
            finished = folder.finished
            resumable = bool(checkpoint.complete_checkpoints(folder.staging))
            if self.config.resume:
                if finished and not resumable:
                    raise BasError(f"{shown} holds a finished run, there is nothing to resume; pass --overwrite instead of --resume to run again.")
                if not resumable:
                    raise BasError(f"{shown} holds no complete checkpoint to resume from; run the command without --resume to start over.")
                self.resume_from = checkpoint.load_latest(folder.staging)
                saved = checkpoint.read_inputs(folder.staging)
                if saved is None:
                    checkpoint.check_same_run(self.resume_from.state["config"], self.config.to_json(), bas_defaults(self.plugins))
                else:
                    checkpoint.check_same_run(saved["config"], resume_record(self.config), bas_defaults(self.plugins))
                    self.saved_inputs = saved.get("inputs")
            else:
                if (finished or resumable) and not self.config.overwrite:
                    what = "an interrupted run" if resumable else "a finished run"
                    hint = "add --resume to continue it, or --overwrite to start over" if resumable else "pass --overwrite to replace it"
                    raise BasError(f"{shown} already holds {what}; {hint}, or choose another --out.")
                reason = runfolder.replaceable(folder.out)
                if reason is not None:
                    raise BasError(f"--out {shown} cannot take a run: {reason}; choose a new or empty folder (a run replaces --out as a whole).")
        except BaseException:
            folder.close()
            raise
        self.out = folder.staging

    def check_inputs(self, scene_input) -> None:
        """The checks of the loaded image and masks that need no model; with --resume, that they
        are the ones the interrupted run was trained on."""
        check_concept_count(scene_input, self.config.init_tokens)
        self.inputs_sha256 = scene_fingerprint(scene_input)
        if self.resume_from is not None:
            checkpoint.check_same_inputs(getattr(self, "saved_inputs", None), self.inputs_sha256)

    def load_scene_input(self):
        """The image and masks, from the mask source with the shared mask cleanup."""
        return load_scene_input(self.plugins, self.resolved.mask_source, self.config)

    def load_components(self) -> Components:
        """The model's parts through its family (quantised where the run asks)."""
        return self.family.load(resolve_model(self.model, self.plugins), LoadPlan(self.device, self.dtype, self.quantize))

    def load(self) -> None:
        t0 = time.perf_counter()
        scene_input = self.load_scene_input()
        self.check_inputs(scene_input)
        self.components: Components = self.load_components()
        c = self.components
        self.resolution = self.config.resolution or c.native_resolution
        self.scene: Scene = prepare_scene(scene_input, self.resolution, self.config.init_tokens, background=self.config.background)
        n = self.scene.num_concepts
        sampler_entries = self.plugins.registry("sampler").entries
        if sampler_entries:
            self.resolved.sampler = self.plugins.choose("sampler").factory(self.config, n)
        self.tokens, ids, self.handle_embeddings = add_handles(c.text_encoders, n, self.scene.init_words(self.config.init_tokens))
        self.token_ids = ids[self.family.sequence_encoder]  # positions in the attended sequence are found by these
        for module in (*c.trainable_modules().values(), c.vae):
            module.requires_grad_(False)
        for embedding in self.handle_embeddings:
            embedding.handles.requires_grad_(True)
        self.prediction_type = self.family.prediction_type(c.noise_scheduler)
        self._cache_latents()
        weight_dtype = self.dtype if self.resolved.strategy.freezes_base else torch.float32
        for module in c.trainable_modules().values():
            place(module, self.device, weight_dtype)
        for embedding in self.handle_embeddings:
            embedding.handles.data = embedding.handles.data.float()
        if self.gradient_checkpointing:
            c.denoiser.enable_gradient_checkpointing()
        self.times["load_s"] = time.perf_counter() - t0

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE latent distribution (mean, std) of images in [-1, 1], computed in fp32."""
        vae = place(self.components.vae, self.device, torch.float32)
        dist = vae.encode(images.to(self.device, torch.float32)).latent_dist
        return dist.mean, dist.std

    def _cache_latents(self) -> None:
        """The image's latents once per flip: each step samples from the cached distribution."""
        image = self.scene.image.unsqueeze(0)
        flipped = torch.flip(image, dims=[-1])
        mean, std = self.encode_images(torch.cat([image, flipped]))
        self.latent_mean, self.latent_std = mean, std
        masks = self.scene.masks.to(self.device)
        self.masks = torch.stack([masks, torch.flip(masks, dims=[-1])])  # (2, N, R, R)

    def release_vae(self) -> None:
        self.components.vae.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def phase2_lr(self) -> float:
        """Phase 2's learning rate of the weights: --phase2-lr, else the weight strategy's default."""
        return self.config.phase2_lr or self.resolved.strategy.default_lr

    @property
    def handle_params(self) -> list[torch.nn.Parameter]:
        """The trainable handle rows, one parameter per text encoder."""
        return [embedding.handles for embedding in self.handle_embeddings]

    # -- text ---------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of ``prompts`` for each text encoder, ``(B, T_i)``, padded to its tokenizer's length."""
        return [
            e.tokenizer(prompts, padding="max_length", max_length=e.max_length, truncation=True, return_tensors="pt").input_ids.to(self.device)
            for e in self.components.text_encoders
        ]

    def token_positions(self, input_ids: list[torch.Tensor], concepts: list[int]) -> list[int]:
        """Where each concept's handle sits in the first prompt's attended token sequence."""
        ids = input_ids[self.family.sequence_encoder][0].tolist()
        return [ids.index(self.token_ids[c]) for c in concepts]

    def conditioning(self, input_ids: list[torch.Tensor], size: ImageSize | None = None) -> Conditioning:
        """The family's conditioning of tokenized prompts; ``size`` defaults to the input image's."""
        return self.family.conditioning(self.components, input_ids, size or self.scene.size)

    def prompt_for(self, concepts: list[int]) -> str:
        return PROMPT_PREFIX + " and ".join(self.tokens[c] for c in concepts)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def noise_and_target(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random noise and timestep, the noisy latents, and the model's training target."""
        return self.family.training_noise(self.components.noise_scheduler, latents, self.generator)

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's prediction for ``noisy`` latents at timesteps ``t`` under ``cond``."""
        return self.family.predict(self.components.denoiser, noisy, t, cond)

    # -- the loop -----------------------------------------------------------------------------
    def step_batch(self, phase: int, step: int) -> StepBatch:
        concepts = self.resolved.sampler(self.rng) if self.resolved.sampler else list(range(self.scene.num_concepts))
        flip = int(self.rng.random() < self.config.flip_p)
        mean, std = self.latent_mean[flip : flip + 1], self.latent_std[flip : flip + 1]
        eps = torch.randn(mean.shape, generator=self.generator, device=self.device)
        latents = self.family.scale_latents(self.components.vae, mean + std * eps)
        noise, t, noisy, target = self.noise_and_target(latents)
        prompt = self.prompt_for(concepts)
        input_ids = self.tokenize([prompt])
        positions = self.token_positions(input_ids, concepts)
        masks = self.masks[flip][concepts].unsqueeze(0)
        with self.autocast():
            cond = self.conditioning(input_ids)
            pred = self.predict(noisy, t, cond)
        return StepBatch(
            step=step, phase=phase, concepts=concepts, prompt=prompt, latents=latents, noise=noise, timesteps=t,
            noisy_latents=noisy, target=target, model_pred=pred, masks=masks, union_mask=masks.amax(dim=1, keepdim=True),
            token_positions=positions, conditioning=cond,
        )

    def named_trainables(self, params: list[torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
        """Stable names for trainable parameters, as checkpoints store them."""
        modules = self.components.trainable_modules().items()
        names = {id(p): f"{prefix}.{n}" for prefix, m in modules for n, p in m.named_parameters()}
        return {names[id(p)]: p for p in params}

    def save_checkpoint(self) -> Path | None:
        """Save the state after the last completed step of the current phase."""
        cur = self.current
        if cur is None:
            return None
        rng = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        version, internal, gauss = self.rng.getstate()
        state = {
            "phase": cur.phase, "step": cur.step, "history": self.history, "times": self.times,
            "python_rng": [version, list(internal), gauss], "config": self.config.to_json(),
        }
        optimizer_state = {"optimizer": cur.optimizer.state_dict(), "scaler": cur.scaler.state_dict()}
        return checkpoint.save(self.out, cur.phase, cur.step, self.named_trainables(cur.params), rng, optimizer_state, state)

    def _restore(self, ckpt: checkpoint.Checkpoint, cur: PhaseState) -> None:
        named = self.named_trainables(cur.params)
        missing = set(named) ^ set(ckpt.trainable)
        if missing:
            raise BasError(f"Checkpoint {ckpt.path} does not match this run's trainable weights ({sorted(missing)[0]}); resume with the same plugins and options.")
        try:  # shapes, the optimizer's parameter groups, RNG states: torch checks them only as it loads them
            with torch.no_grad():
                for name, p in named.items():
                    if ckpt.trainable[name].shape != p.shape:
                        raise ValueError(f"{name} has the shape {tuple(ckpt.trainable[name].shape)}, the run's {tuple(p.shape)}")
                    p.copy_(ckpt.trainable[name].to(p.device, p.dtype))
            cur.optimizer.load_state_dict(ckpt.optimizer["optimizer"])
            cur.scaler.load_state_dict(ckpt.optimizer["scaler"])
            self.generator.set_state(ckpt.rng["generator"])
            torch.set_rng_state(ckpt.rng["torch_cpu"])
            if "torch_cuda" in ckpt.rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(ckpt.rng["torch_cuda"], self.device)
            version, internal, gauss = ckpt.state["python_rng"]
            self.rng.setstate((version, tuple(internal), gauss))
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise BasError(f"Checkpoint {ckpt.path} does not fit this run ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           "it is damaged or from other options: start over with --overwrite instead of --resume.") from exc
        self.history = ckpt.state["history"]
        self.times.update({k: v for k, v in ckpt.state["times"].items() if k.startswith("phase")})
        cur.step = ckpt.step

    def request_stop(self) -> None:
        """Stop after the current step and save a checkpoint, as one Ctrl-C does; safe from any thread."""
        self._stop_requested = True

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.request_stop()

    def _stop_at_step_boundary(self):
        """Ctrl-C finishes the current step, so the checkpoint holds a consistent state."""
        return io.sigint_handler(self._request_stop)

    def _stop(self, reason: type[BasError], message: str) -> None:
        path = self.save_checkpoint()
        where = f"; the state after step {self.current.step} is saved in {path}" if path else ""
        raise reason(message.format(where=where))

    def run_phase(self, phase: int, steps: int, groups: list[dict]) -> None:
        """Train ``steps`` steps of ``phase``.  ``groups`` are the optimizer's parameter groups, each
        ``{"params": [...], "lr": float, "option": "--phase2-lr"}`` (the option that sets its rate)."""
        if steps == 0:
            return
        self.phase = phase
        terms = [t for t in self.resolved.loss_terms if phase in t.phases]
        params = [p for g in groups for p in g["params"]]
        optimizer = self.resolved.optimizer_factory([{"params": g["params"], "lr": g["lr"]} for g in groups], self.config)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        cur = self.current = PhaseState(phase, 0, optimizer, scaler, params)
        if self.resume_from is not None and self.resume_from.phase == phase:
            self._restore(self.resume_from, cur)
            self.resume_from = None
        on_step = _observer_calls(self.resolved.observers, "on_step")
        for call in _observer_calls(self.resolved.observers, "on_phase_start"):
            call(self, phase)
        history = self.history[f"phase{phase}"]
        lr_option, lr = groups[0]["option"], groups[0]["lr"]
        t_phase = time.perf_counter()
        for step in range(cur.step + 1, steps + 1):
            if self._stop_requested:
                self._stop(Interrupted, f"Interrupted at phase {phase} step {step - 1}{{where}}; run the same command with --resume added to continue.")
            t0 = time.perf_counter()
            batch, values, loss = self.forward_step(phase, step, terms)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                bad = ", ".join(f"'{k}'" for k, v in values.items() if not torch.isfinite(v.detach()).all())
                fix = "use --precision bf16 instead of fp16, or" if self.precision == "fp16" else "try"
                self._stop(NumericalError, f"The loss became {loss_value} at phase {phase} step {step} in term {bad}{{where}}; "
                           f"{fix} a lower {lr_option} (now {lr:g}).")
            self.update(loss, optimizer, scaler, params)
            cur.step = step
            record = StepRecord(
                phase=phase, step=step, total_steps=steps, loss=loss_value,
                terms={k: float(v.detach()) for k, v in values.items()}, prompt=batch.prompt,
                seconds=time.perf_counter() - t0,
            )
            history.append({"step": step, "loss": record.loss, **record.terms})
            for call in on_step:
                call(self, record)
        self.times[f"phase{phase}_s"] = self.times.get(f"phase{phase}_s", 0.0) + time.perf_counter() - t_phase
        for call in _observer_calls(self.resolved.observers, "on_phase_end"):
            call(self, phase)

    def forward_step(self, phase: int, step: int, terms: list[LossTerm]) -> tuple[StepBatch, dict[str, torch.Tensor], torch.Tensor]:
        """One step's batch, its weighted loss terms and their sum (the graph the update differentiates)."""
        batch = self.step_batch(phase, step)
        with self.autocast():
            values = {term.name: term(batch) * term.weight for term in terms}
        return batch, values, sum(values.values())

    def update(self, loss: torch.Tensor, optimizer, scaler, params: list[torch.nn.Parameter]) -> None:
        """Backward, clip, the optimizer's step, and the gradients freed."""
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def phase2_groups(self) -> list[dict]:
        """Phase 2's parameter groups, the weight strategy's weights prepared (adapters added) and the
        text encoders set to train."""
        handles = self.handle_params
        torch.manual_seed(self.config.seed)  # adapter initialisation draws from the global generator
        weights = self.resolved.strategy.prepare(self)
        # adapter libraries freeze every non-adapter parameter they find, the handles included
        for p in handles:
            p.requires_grad_(True)
        for p in weights:  # trainable parameters train in fp32 whatever the base dtype
            p.data = p.data.float()
        # train mode only where the strategy trains an encoder's weights: one whose only trainable rows are
        # the handles (FLUX's T5) stays in eval, or its dropout would perturb the conditioning the weights
        # learn from and freeze one dropout sample into the states FLUX caches (inference runs it in eval)
        for encoder in (e.model for e in self.components.text_encoders):
            if not trains_weights(encoder, handles):
                continue
            if self.gradient_checkpointing:
                enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
                enable()
            encoder.train()
        # the handles keep their own low rate (the paper's 2e-6), so phase 2 leaves them near where phase 1 put them
        return [
            {"params": weights, "lr": self.phase2_lr, "option": "--phase2-lr"},
            {"params": handles, "lr": self.config.phase2_handle_lr, "option": "--phase2-handle-lr"},
        ]

    def train(self) -> None:
        c = self.components
        for term in self.resolved.loss_terms:
            term.setup(self)
        self.release_vae()
        for call in _observer_calls(self.resolved.observers, "on_run_start"):
            call(self)
        handles = self.handle_params
        encoders = [e.model for e in c.text_encoders]
        c.denoiser.train()
        if self.resume_from is None or self.resume_from.phase == 1:
            self.run_phase(1, self.config.phase1_steps, [{"params": handles, "lr": self.config.phase1_lr, "option": "--phase1-lr"}])
        if self.config.phase2_steps:
            self.run_phase(2, self.config.phase2_steps, self.phase2_groups())
        for module in (c.denoiser, *encoders):
            module.eval()
        for term in self.resolved.loss_terms:
            term.teardown(self)

    # -- output -------------------------------------------------------------------------------
    def handles_state(self) -> dict[str, torch.Tensor]:
        """What ``handles.safetensors`` holds: ``{"<asset0>": row, ...}`` of the first text encoder,
        ``{"text_encoder_2.<asset0>": row, ...}`` of any other (:mod:`bas.core.handles`)."""
        return handles_file_state(self.tokens, [e.name for e in self.components.text_encoders], self.handle_params)

    def save(self) -> dict:
        """Write the handles, the strategy's weights and, last, run.json (which marks a complete run)
        into ``self.out`` (the staging folder while the run works; :func:`extract` swaps it in)."""
        self.out.mkdir(parents=True, exist_ok=True)
        io.write_safetensors(self.out / "handles.safetensors", self.handles_state(), metadata={"base_model": self.model})
        weight_files = list(self.resolved.strategy.save(self, self.out)) if self.config.phase2_steps else []
        for name in weight_files:  # a plugin's paths become readers' paths: they must stay in the folder
            if not io.inside(self.out, name, f"Weight strategy '{self.resolved.strategy_name}'").exists():
                raise BasError(f"Weight strategy '{self.resolved.strategy_name}' says it wrote {name}, but it is not there; report this to the plugin's authors.")
        files = ["handles.safetensors"] + weight_files
        files += run_inputs.save_inputs(self.out, self.scene)  # what `bas eval` compares generated concepts with
        info = {
            "bas_version": __version__,
            "model": self.model,
            "family": self.family.name,
            "family_defaults": self.family_defaults,
            "weights": self.resolved.strategy_name if self.config.phase2_steps else None,
            "handles": self.tokens,
            "init_tokens": self.config.init_tokens,
            "masks": self.scene.mask_names,
            "background": self.tokens[-1] if self.scene.background else None,
            "resolution": self.resolution,
            "seed": self.config.seed,
            "device": str(self.device),
            "precision": self.precision,
            "optimizer": self.optimizer_name,
            "gradient_checkpointing": self.gradient_checkpointing,
            "quantize": self.quantize,
            "prediction_type": self.prediction_type,
            "model_settings": self.config.model_settings,
            "learning_rates": {"phase1": self.config.phase1_lr, "phase2": self.phase2_lr, "phase2_handles": self.config.phase2_handle_lr},
            "plugins": {name: {"version": i.version, "source": i.source, "default": i.default, "explicit": i.explicit} for name, i in self.plugins.infos.items()},
            "plugin_names": self.config.plugins,
            "loss_terms": [{"name": t.name, "weight": t.weight, "phases": list(t.phases)} for t in self.resolved.loss_terms],
            "config": self.config.to_json(),
            "history": self.history,
            "times": self.times,
            "resumed": bool(self.config.resume),
            "inputs_sha256": getattr(self, "inputs_sha256", None),
            "weight_files": weight_files,
            "files": files,
        }
        for plugin, names in self.plugins.call_each("bas_write_run_files", run=self, out=self.out, info=info):  # model-card: textual inversions, README.md
            for name in names or []:  # as the strategy's weight files: readers take these names as paths
                if not io.inside(self.out, name, f"Plugin '{plugin}'").exists():
                    raise BasError(f"Plugin '{plugin}' says it wrote {name}, but it is not there; report this to the plugin's authors.")
                info["files"].append(name)
        contents = runfolder.run_contents(self.out)  # everything the run wrote: weights, inputs, report, logs, ...
        info["checksums"] = runfolder.checksums(self.out, contents)
        info["sealed_folders"] = [name for name in contents if name.endswith("/")]  # no file may be added to them
        runfolder.fault_point("save:before-run-json")
        io.write_json(self.out / "run.json", info)
        return info


OOM_ADVICE = (  # ordered by how much memory each saves
    ("--plugin lora instead of --plugin full", lambda run: run.resolved.strategy_name == "full"),
    ("--optimizer adamw8bit", lambda run: run.optimizer_name != "adamw8bit" and run.device.type == "cuda"),
    ("--gradient-checkpointing", lambda run: not run.gradient_checkpointing),
    ("--precision bf16", lambda run: run.precision == "fp32" and run.device.type == "cuda"),
    ("a lower --resolution (such as 384)", lambda run: True),
)


def out_of_memory_message(run: Run) -> str:
    tips = [tip for tip, applies in OOM_ADVICE if applies(run)]
    return f"Out of memory on {run.device}; reduce memory with, in order of effect: {', '.join(tips)}."


def check_run(config: RunConfig, plugins: Plugins) -> None:
    """The checks :func:`extract` makes before it touches ``--out`` or loads a model, run on their own:
    the options, every plugin's, the family's, and the scene's image and masks (their number against
    ``--init-token``).  A mask source that needs a model of its own (``loads_a_model``) is left to
    the run.  ``bas ui`` runs this when Start is pressed, so a mistake is said then, not when the
    queued run starts."""
    run = Run(config, plugins)
    if not getattr(run.resolved.mask_source, "loads_a_model", False):
        run.check_inputs(load_scene_input(plugins, run.resolved.mask_source, config))


def trains_weights(module: nn.Module, handles) -> bool:
    """Whether ``module`` has a trainable parameter besides the handle rows (an adapter, or its own weights)."""
    rows = {id(p) for p in handles}
    return any(p.requires_grad and id(p) not in rows for p in module.parameters())


def extract(config: RunConfig, plugins: Plugins) -> Run:
    """Run the whole extraction and write the output folder; returns the finished :class:`Run`.

    The run works in a staging folder beside ``config.out`` and replaces ``config.out`` only
    when it is complete (:mod:`bas.core.runfolder`).  After a failure ``config.out`` is as it
    was; the staging folder stays only when it holds a checkpoint to ``--resume`` from.
    """
    t0 = time.perf_counter()
    run = Run(config, plugins)
    run.check_out()
    folder = run.folder
    try:
        run.load()
        if not config.resume:
            folder.start()  # the inputs are valid and the model loaded: now an earlier interrupted run may go
            checkpoint.write_inputs(folder.staging, {"config": resume_record(config), "inputs": run.inputs_sha256})
        with run._stop_at_step_boundary():
            run.train()
        run.times["total_s"] = time.perf_counter() - t0
        for call in _observer_calls(run.resolved.observers, "on_run_end"):
            call(run)
        info = run.save()
        folder.commit()
    except BaseException as exc:
        for call in _observer_calls(run.resolved.observers, "on_run_failed"):
            with contextlib.suppress(Exception):  # closing a progress bar must not hide the error
                call(run, exc)
        resumable = bool(checkpoint.complete_checkpoints(folder.staging))
        folder.abandon(keep=resumable)
        if isinstance(exc, KeyboardInterrupt) and resumable:  # a second Ctrl-C: the last periodic checkpoint stays
            raise Interrupted(f"Interrupted; {config.out} is unchanged and the newest checkpoint is kept: run the same command "
                              "with --resume added to continue from it.") from None
        if is_out_of_memory(exc):
            raise BasError(out_of_memory_message(run)) from exc
        error = io.environment_error(exc)
        if error is not None:
            then = " then run the same command with --resume added to continue." if resumable else f" {config.out} is unchanged."
            raise BasError(f"{error}{then}") from exc
        raise
    finally:
        folder.close()
    run.out = folder.out  # the finished folder, no longer the staging one
    run.info = info
    return run


def input_paths(config: RunConfig, plugins: Plugins) -> list[tuple[str, Path]]:
    """Every file or folder a run's options name, as ``(option, path)``: the image, a local model,
    and the values of every plugin option of click's ``Path`` type (masks, scene, class images, ...)."""
    return runfolder.option_paths(config.image, config.model, config.options, (opt for _, opt in plugins.run_options()))


def resume_record(config: RunConfig) -> dict:
    """The options a resumed run must match, with paths resolved (the same file by another path matches)."""
    def norm(value):
        if isinstance(value, Path):
            return str(value.expanduser().resolve())
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value

    data = config.to_json()
    data["image"] = norm(Path(config.image)) if config.image else None
    if config.model and Path(config.model).expanduser().exists():
        data["model"] = norm(Path(config.model))
    data["options"] = {k: norm(v) for k, v in config.options.items()}
    return json.loads(json.dumps(data, default=str))

def latent_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B, 1, H, W) image-resolution mask averaged down to ``like``'s spatial size."""
    return F.interpolate(mask.float(), size=like.shape[-2:], mode="area")
