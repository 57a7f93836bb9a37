"""The memory plan of a run: its own training step on fake tensors, the bytes counted at every operation.

:class:`PlanRun` is a :class:`bas.core.training.Run` for a device this machine may not have: its
parts come from their config files as fake tensors (:mod:`bas.memory.meta`), the scene is a
stand-in with the run's number of concepts, and it runs the run's own loading (latents cached with
the VAE on the device, the weights placed in their dtype), then two steps of each phase (the second
holds the optimizer's state, as every later step does) through ``Run.forward_step`` and
``Run.update``, with the loss terms and plugins the run would use.  :class:`LiveStorages` counts
the device's live storages meanwhile; nothing is computed (fake tensors have shapes, not values), so
a plan of FLUX.1 at 1024 px takes seconds.  The optimizers' states are stand-ins of the sizes
torch's AdamW and bitsandbytes' AdamW8bit allocate (:class:`PlannedAdamW`).

Nothing in a plan may read a tensor's values (``if mask.any()``, ``.item()``, ``int(t)``, boolean
indexing): fake tensors have none.  bas checks its inputs on their arrays, before they become tensors;
a plugin's code sees ``run.planning`` true in a plan, skips its value checks and what would write or
generate files there, and says what it assumed instead with ``run.assume(...)`` (prior preservation:
its class images).  A plugin that still reads values stops the plan with one line naming it
(:func:`unplannable`).
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from bas.core.errors import BasError
from bas.core.model import resolve_model, resolve_precision
from bas.core.plugins import Plugins
from bas.core.scene import SceneInput
from bas.core.training import Run, RunConfig
from bas.memory.meta import PACKAGED, fake_components, packaged_folder
from bas.memory.tracking import LiveStorages, TargetDevice, fake_module_conversion, module_tensors

DEFAULT_CONCEPTS = 2  # without --mask: a scene of two concepts


@dataclass
class PhaseMemory:
    """Bytes on the device in one phase: what its steps hold throughout and their peak."""

    frozen_weights: int = 0
    trainable_params: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0  # kept for backward at the end of the forward pass (the loss terms' tensors included)
    attention_maps: int = 0  # the maps the attention loss captured, part of the activations
    other: int = 0  # cached latents, masks, caches
    peak: int = 0


@dataclass
class Plan:
    """A run's predicted memory on its device: the settings it was planned with, the VAE and text
    encoders, and per phase (``load``: latents cached with the VAE on the device and the weights placed)."""

    model: str
    family: str
    device: str
    strategy: str
    precision: str
    resolution: int
    optimizer: str
    gradient_checkpointing: bool
    quantize: str
    lora_rank: int | None
    concepts: int
    vae: dict = field(default_factory=dict)
    text_encoders: dict = field(default_factory=dict)
    attention_kernels: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    assumptions: list = field(default_factory=list)  # what plugins assumed instead of what a plan cannot do (run.assume)

    @property
    def peak(self) -> int:
        return max(p["peak"] for p in self.phases.values())

    def to_json(self) -> dict:
        return {**asdict(self), "peak": self.peak}


class PlannedAdamW:
    """The memory of the run's optimizer: torch's AdamW (two fp32 states per parameter; on the CPU its
    per-parameter temporaries too, CUDA's fused kernel has none) or bitsandbytes' AdamW8bit (two uint8
    states and an fp32 absmax per 256 values for tensors of 4096 values or more, fp32 states below)."""

    def __init__(self, groups, eight_bit: bool, fused: bool):
        self.params = [p for g in groups for p in g["params"]]
        self.eight_bit, self.fused = eight_bit, fused
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def _init(self, p):
        if self.eight_bit and p.numel() >= 4096:
            blocks = math.ceil(p.numel() / 256)
            return {
                "state1": torch.zeros_like(p, dtype=torch.uint8),
                "state2": torch.zeros_like(p, dtype=torch.uint8),
                "absmax1": p.new_zeros(blocks, dtype=torch.float32),
                "absmax2": p.new_zeros(blocks, dtype=torch.float32),
            }
        return {"exp_avg": torch.zeros_like(p, dtype=torch.float32), "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}

    def allocate(self):
        for p in self.params:
            self.state.setdefault(p, self._init(p))

    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            state = self.state.setdefault(p, self._init(p))
            if "exp_avg" in state:
                state["exp_avg"].lerp_(p.grad, 0.1)
                state["exp_avg_sq"].mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
                if self.fused or self.eight_bit:
                    p.data.add_(state["exp_avg"], alpha=-1e-4)
                else:  # torch's single-tensor AdamW (the CPU's): denom = sqrt(v) / bias_correction + eps
                    denom = (state["exp_avg_sq"].sqrt() / 0.9).add_(1e-8)
                    p.data.addcdiv_(state["exp_avg"], denom, value=-1e-4)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    def states(self) -> list[torch.Tensor]:
        return [t for s in self.state.values() for t in s.values()]


class _NoScaler:
    """fp16's GradScaler holds a few scalars; the plan's step runs without one."""

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        pass

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass


class PlanRun(Run):
    """A run planned for ``device``, computing on fake tensors (see the module docstring)."""

    planning = True

    def __init__(self, config: RunConfig, plugins: Plugins, device: torch.device, concepts: int, tracker: LiveStorages, fake):
        self.planned_device = device
        self.concepts = concepts
        self.tracker = tracker
        self.fake = fake
        self.assumptions: list[str] = []
        super().__init__(config, plugins)
        self.target = self.device
        self.device = torch.device("cpu")  # the fake tensors' device; their sizes are the target's
        self.kernel_mode = TargetDevice(self.target.type)

    def resolve_device(self) -> torch.device:
        return self.planned_device

    def assume(self, text: str) -> None:
        """What a plugin assumed instead of what a plan cannot do (a sentence; the plan shows it)."""
        self.assumptions.append(text)

    def resolve_precision(self) -> str:
        """On CUDA, a GPU with bf16 (Ampere or newer): ``auto`` is bf16 there, as bas picks it."""
        if self.device.type != "cuda" or self.config.precision not in ("auto", "fp16", "bf16"):
            return resolve_precision(self.config.precision, self.device)
        return "bf16" if self.config.precision == "auto" else self.config.precision

    def generator_device(self) -> torch.device:
        return torch.device("cpu")

    def load_scene_input(self) -> SceneInput:
        """A stand-in scene of ``concepts`` vertical stripes (the image's pixels do not change the memory)."""
        size = 64
        masks = []
        for i in range(self.concepts):
            mask = np.zeros((size, size), dtype=np.float32)
            mask[:, i * size // (self.concepts + 1) : (i + 1) * size // (self.concepts + 1)] = 1.0
            masks.append(mask)
        return SceneInput(Image.new("RGB", (size, size), (128, 128, 128)), masks, [f"mask {i}" for i in range(self.concepts)])

    def check_inputs(self, scene_input) -> None:
        pass

    def load_components(self):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # built on the meta device, then made fake tensors (not operations of the run)
            components, on_device = fake_components(self.family, resolve_model(self.model, self.plugins), self.fake, self.quantize, self.dtype)
        for module in on_device:  # loaded straight onto the device, quantised
            self.tracker.include(module_tensors(module))
        return components

    def load(self) -> None:
        super().load()
        self.tracker.include(self.device_tensors())  # the weights, placed on the device in their dtype
        self.tracker.include([self.scene.image, self.scene.masks])

    def encode_images(self, images):
        self.tracker.include(module_tensors(self.components.vae))  # the VAE goes onto the device to cache the latents
        return super().encode_images(images)

    def release_vae(self) -> None:
        if self.target.type != "cpu":  # moved to the CPU: off a GPU's memory, still in a CPU's
            self.tracker.exclude(module_tensors(self.components.vae))

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.dtype)  # with TargetDevice: CUDA's autocast

    def tokenize(self, prompts):
        """Real ids (the stand-in tokenizers'), on the CPU: the run reads where its handles are."""
        return [e.tokenizer(prompts, padding="max_length", max_length=e.max_length, truncation=True).input_ids for e in self.components.text_encoders]

    def token_positions(self, input_ids, concepts):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return super().token_positions(input_ids, concepts)

    def step_batch(self, phase, step):
        batch = super().step_batch(phase, step)
        stores = [t.store for t in self.resolved.loss_terms if hasattr(getattr(t, "store", None), "forwards")]
        self.captured = self.tracker.bytes_of([m for s in stores for _, maps in s.forwards for m in maps])
        return batch

    # -- the plan ------------------------------------------------------------------------------------
    def device_tensors(self) -> list[torch.Tensor]:
        return [t for m in self.components.trainable_modules().values() for t in module_tensors(m)]

    def measure_phase(self, phase: int, groups: list[dict]) -> PhaseMemory:
        terms = [t for t in self.resolved.loss_terms if phase in t.phases]
        params = [p for g in groups for p in g["params"]]
        optimizer = PlannedAdamW(groups, self.optimizer_name == "adamw8bit", fused=self.target.type == "cuda")
        memory = PhaseMemory()
        optimizer.allocate()  # as after the phase's first step: every later step holds the states
        self.captured = 0
        start = self.tracker.now
        self.tracker.reset_peak()
        batch, values, loss = self.forward_step(phase, 1, terms)
        forward = self.tracker.now
        del batch, values
        self.update(loss, optimizer, _NoScaler(), params)
        del loss
        tensors = self.device_tensors()
        memory.trainable_params = self.tracker.bytes_of([t for t in tensors if t.requires_grad])
        trainable = {t.untyped_storage()._cdata for t in tensors if t.requires_grad}
        memory.frozen_weights = self.tracker.bytes_of([t for t in tensors if t.untyped_storage()._cdata not in trainable])
        memory.gradients = sum(p.numel() * p.element_size() for p in params)
        memory.optimizer_states = self.tracker.bytes_of(optimizer.states())
        memory.activations = forward - start
        memory.attention_maps = self.captured
        memory.other = start - memory.frozen_weights - memory.trainable_params - memory.optimizer_states
        memory.peak = self.tracker.peak
        return memory

    def plan(self) -> dict[str, PhaseMemory]:
        phases = {}
        self.tracker.reset_peak()
        self.load()
        for term in self.resolved.loss_terms:  # with the VAE still on the device, as a run sets them up (prior preservation's latents)
            term.setup(self)
        phases["load"] = PhaseMemory(peak=self.tracker.peak, frozen_weights=self.tracker.bytes_of(self.device_tensors()))
        self.release_vae()
        self.components.denoiser.train()
        if self.config.phase1_steps:
            phases["phase1"] = self.measure_phase(1, [{"params": self.handle_params, "lr": self.config.phase1_lr}])
        if self.config.phase2_steps:
            phases["phase2"] = self.measure_phase(2, self.phase2_groups())
        for term in self.resolved.loss_terms:
            term.teardown(self)
        return phases


def planned_device(device: str) -> torch.device:
    """``--device`` for a plan: ``cuda`` need not be on this machine; ``auto`` is this machine's."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device) if device in ("cpu", "cuda") or device.startswith("cuda:") else None
    if dev is None:
        raise BasError(f"--device {device} cannot be planned; plan for cpu or cuda.")
    return torch.device(dev.type)


def concept_count(config: RunConfig) -> int:
    """The run's concepts as its options name them (``--mask`` files, a ``--scene`` folder's masks), else 2
    (--background adds one more, as the run does)."""
    import re
    from pathlib import Path

    masks = config.options.get("masks") or ()
    scene = config.options.get("scene")
    if not masks and scene and Path(scene).is_dir():
        masks = [p for p in Path(scene).iterdir() if re.fullmatch(r"mask\d+\.png", p.name)]
    return len(masks) or DEFAULT_CONCEPTS


def reads_values(exc: BaseException) -> bool:
    """Whether ``exc`` is a fake tensor's refusal to give values: a branch on one (``.any()``, ``.item()``,
    ``int()``), an output whose shape its values decide (boolean indexing, ``nonzero``), ``.numpy()``."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    if isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException)):
        return True
    return isinstance(exc, RuntimeError) and "not supported for tensor subclasses" in str(exc)


def unplannable(exc: BaseException, plugins: Plugins) -> BasError | None:
    """The one line for a plan that stopped where a plugin's code reads a tensor's values: the
    innermost frame in a plugin's module (its own, or an installed plugin's package) names it;
    ``None`` where only bas's code is in the traceback, built-in plugins included (a bug of bas's,
    which keeps its traceback, as :func:`bas.core.failures.plugin_failure` has it)."""
    from bas.core.failures import innermost_frame
    from bas.core.plugins import BUILTIN_PLUGINS, installed_plugin_packages

    modules, packages = {}, {}
    for name, obj in plugins.pm.list_name_plugin():
        if name not in BUILTIN_PLUGINS:
            modules[obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", "")] = name
    for package, name in installed_plugin_packages().items():
        if name in plugins.infos:
            packages[package] = name
    found = innermost_frame(exc, lambda module: modules.get(module) or packages.get(module.split(".", 1)[0]))
    if found is None:
        return None
    name, function = found
    info = plugins.infos.get(name)
    how = f"with --plugin no:{name}" if info is not None and info.default else f"without --plugin {name}"
    return BasError(
        f"Plugin '{name}' reads a tensor's values in {function}, which a memory plan cannot (it computes shapes, not values), "
        f"so the run's memory with it cannot be predicted; plan {how} to leave it out, and ask its authors to skip "
        "such checks where run.planning is true."
    )


def make_plan(config: RunConfig, plugins: Plugins) -> Plan:
    """The memory plan of the run ``config`` describes, on its ``--device`` (``cuda`` need not be here)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    shown = config.model
    if config.model in PACKAGED:  # shipped configs: no hub access for the four published pipelines bas plans offline
        config = replace(config, model=str(packaged_folder(config.model)))
    device = planned_device(config.device)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = LiveStorages()

    def fake(t):
        return FakeTensor(mode, t, torch.device("cpu")) if t.device.type == "meta" else t

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FLUX's "unquantised on the CPU" and libraries' notes are about a real run
        run = PlanRun(config, plugins, device, concept_count(config), tracker, fake)
        if shown is None and run.model in PACKAGED:
            shown = run.model
        kernels = run.kernel_mode if device.type == "cuda" else contextlib.nullcontext()  # the CPU's own choices are the CPU's
        try:
            with torch.random.fork_rng(), fake_module_conversion(), mode, tracker, kernels:
                phases = run.plan()
        except RuntimeError as exc:
            error = unplannable(exc, plugins) if reads_values(exc) else None
            if error is None:
                raise
            raise error from None
    return Plan(
        model=shown or run.model,
        family=run.family.name,
        device=device.type,
        strategy=run.resolved.strategy_name,
        precision=run.precision,
        resolution=run.resolution,
        optimizer=run.optimizer_name,
        gradient_checkpointing=bool(run.gradient_checkpointing),
        quantize=run.quantize,
        lora_rank=getattr(run.resolved.strategy, "rank", None),
        concepts=run.scene.num_concepts,
        vae={
            "bytes": _module_bytes(run.components.vae),
            "dtype": "fp32",
            "where": "on the device while the latents are cached, then moved to the CPU",
        },
        text_encoders={e.name: _module_bytes(e.model) for e in run.components.text_encoders},
        attention_kernels=dict(run.kernel_mode.kernels),
        phases={name: asdict(p) for name, p in phases.items()},
        assumptions=list(run.assumptions),
    )


def _module_bytes(module) -> int:
    seen = {}
    for t in module_tensors(module):
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


ROWS = (
    ("frozen_weights", "frozen weights"),
    ("trainable_params", "trainable parameters"),
    ("gradients", "gradients"),
    ("optimizer_states", "optimizer states"),
    ("activations", "activations kept for backward"),
    ("attention_maps", "  of which attention maps the loss reads"),
    ("other", "latents, masks, caches"),
    ("peak", "predicted peak"),
)
PHASE_TITLES = {"load": "loading", "phase1": "phase 1", "phase2": "phase 2"}


def gigabytes(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**27 else f"{n / 2**20:.1f} MB"


def format_plan(plan: Plan) -> str:
    """The plan as a table for people: a column per phase, a row per kind of memory."""
    optimizer = {"adamw": "AdamW (fp32 states)", "adamw8bit": "8-bit AdamW"}.get(plan.optimizer, plan.optimizer)
    rank = f" rank {plan.lora_rank}" if plan.strategy == "lora" and plan.lora_rank else ""
    lines = [
        f"Memory plan (predicted, from the configs; no weights loaded): {plan.family} {plan.model} on {plan.device}",
        f"  {plan.strategy}{rank}, {plan.precision}, {plan.resolution} px, batch 1, {plan.concepts} concepts, {optimizer}, "
        f"gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}, quantize {plan.quantize}",
    ]
    names = list(plan.phases)
    lines.append(f"  {'':40}" + "".join(f"{PHASE_TITLES.get(n, n):>12}" for n in names))
    for key, label in ROWS:
        cells = []
        for n in names:
            value = plan.phases[n].get(key, 0)
            cells.append("" if n == "load" and key not in ("frozen_weights", "peak") else gigabytes(value))
        lines.append(f"  {label:40}" + "".join(f"{c:>12}" for c in cells))
    where = "moved to the CPU after caching the latents" if plan.device != "cpu" else "kept (the device is the CPU)"
    lines.append(f"  VAE: {gigabytes(plan.vae['bytes'])} fp32, on the device while the latents are cached, then {where}.")
    encoders = ", ".join(f"{name} {gigabytes(size)}" for name, size in plan.text_encoders.items())
    lines.append(f"  Text encoders ({encoders}): on the device in both phases; their handle rows train, so their outputs cannot be cached.")
    if plan.attention_kernels:
        lines.append("  Attention kernels as the GPU picks them: " + ", ".join(f"{k} x{v}" for k, v in sorted(plan.attention_kernels.items())) + ".")
    for text in plan.assumptions:
        lines.append(f"  Assumed: {text}")
    lines.append(f"Predicted peak: {gigabytes(plan.peak)} (torch.cuda.max_memory_allocated; the CUDA context and allocator cache come on top).")
    return "\n".join(lines)
