"""The small protocols that plugins implement, and the records the training loop passes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from bas.core.family import Conditioning
    from bas.core.training import Run


@dataclass
class StepBatch:
    """Everything one training step has computed, as loss terms see it.

    Shapes: latents, noise, noisy_latents, target, model_pred are ``(B, C, h, w)``; ``masks`` is
    ``(B, K, H, W)`` at image resolution for the ``K`` concepts shown this step (in prompt order);
    ``union_mask`` is ``(B, 1, H, W)``; ``token_positions[k]`` is the index of concept ``k``'s handle
    token in the prompt's attended sequence.  ``conditioning`` is what the model family made of the
    prompt (:class:`bas.core.family.Conditioning`; its ``hidden_states`` are the tokens the
    denoiser attended to).  ``extras`` lets a term's ``setup`` leave state (attention maps, ...)
    that its ``__call__`` reads.
    """

    step: int
    phase: int
    concepts: list[int]
    prompt: str
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor
    target: torch.Tensor
    model_pred: torch.Tensor
    masks: torch.Tensor
    union_mask: torch.Tensor
    token_positions: list[int]
    conditioning: "Conditioning"
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepRecord:
    """What observers get after each optimizer step."""

    phase: int
    step: int  # 1-based within the phase
    total_steps: int  # steps in this phase
    loss: float
    terms: dict[str, float]
    prompt: str
    seconds: float


class LossTerm:
    """A term of the training loss.  Subclasses set ``name`` and ``weight`` and define ``__call__``.

    ``phases`` says in which phases (1, 2) the term is active.
    """

    name: str = "loss"
    weight: float = 1.0
    phases: tuple[int, ...] = (1, 2)
    # Whether the term needs the base model beside the adapted one (it switches adapters off to ask it): then
    # it runs only with a weight strategy that adds adapters (``WeightStrategy.freezes_base``), and a run with
    # another (``--plugin full``) is refused before any weight loads.  Set it on the class you register.
    needs_adapters: bool = False

    def setup(self, run: "Run") -> None:
        """Prepare the model before training (install hooks, precompute data).  Under ``bas run --plan``
        (``run.planning``) tensors have no values: read none, write and generate nothing, and say what
        was assumed instead with ``run.assume(text)``."""

    def teardown(self, run: "Run") -> None:
        """Undo ``setup`` so the model is clean for saving and generation."""

    def __call__(self, batch: StepBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class WeightStrategy:
    """Which weights phase 2 trains, and how they are saved and applied again.

    The run's model family (``run.family``) says which components there are
    (``run.components.trainable_modules()``) and where LoRA goes (``family.lora_targets``).
    """

    name: str = "weights"
    default_lr: float = 1e-4
    # Whether the UNet and text encoder stay frozen apart from added parameters (adapters): then
    # their base weights may be stored in half precision to save memory.
    freezes_base: bool = True

    def prepare(self, run: "Run") -> list[torch.nn.Parameter]:
        """Make phase 2's weights trainable (inject adapters, ...) and return them (not the
        handles: the run trains those in their own parameter group)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def save(self, run: "Run", out: Path) -> list[str]:
        """Write the trained weights under ``out``; return the paths written, relative to ``out``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def load_pipeline(self, out: Path, run_info: dict, load: Callable[[str], Any]) -> Any:
        """Return a pipeline carrying the weights saved under ``out``.

        ``load(model_id_or_path)`` loads the run's family's diffusers pipeline on the right device
        and dtype; the base model of the run is ``run_info["model"]``.  Handles are added by the
        core afterwards to every tokenizer that does not already know them.
        """
        raise NotImplementedError  # pragma: no cover - abstract
