"""What ``bas eval`` hands evaluator plugins and what they return: the contract of ``bas_register_evaluators``.

An evaluator (a plugin) implements :class:`Evaluator`, declares its :class:`Metric` s and scores
:class:`Sample` s of an :class:`EvalRun`; :class:`EvalConfig` holds the options of one ``bas eval``.
The evaluation itself (prompts, generation, scoring, eval.json) is the verb :mod:`bas.evaluation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from bas.core import checks
from bas.core.errors import BasError
from bas.core.handles import HANDLE_PATTERN
from bas.core.run_inputs import load_inputs


# -- what evaluators see ------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One score an evaluator gives: its name (a column of eval.csv), what it measures, its direction."""

    name: str
    description: str
    higher_is_better: bool = True


class Evaluator:
    """What an evaluator plugin registers (a base class for convenience; any object with these works).

    ``bas eval`` makes it once (``factory(config)``, cheap: no model yet), calls :meth:`check`
    for every run before anything loads or generates, :meth:`load` once, then :meth:`score` per run.
    """

    name: str = ""
    metrics: tuple[Metric, ...] = ()
    # prompt template sets this evaluator offers to --templates, and the one it prefers by default
    templates: dict[str, Sequence[str]] = {}
    default_templates: str | None = None

    @classmethod
    def default_for(cls, info: dict) -> bool:
        """Whether this evaluator is used without ``--evaluator`` for a run with this run.json."""
        return True

    def check(self, run: "EvalRun") -> None:
        """Raise :class:`BasError` if this run cannot be scored (missing inputs, class words, ...)."""

    def load(self, device) -> None:
        """Load models once per ``bas eval``, on ``device`` (a ``torch.device``)."""

    def score(self, run: "EvalRun", samples: Sequence["Sample"]) -> Iterable[dict[str, Any]]:
        """One dict per sample, in order: ``{metric name: float}`` for the metrics that apply to that
        image (an absent metric does not apply), plus any other keys as per-image details."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Lines the output shows about how this evaluator measured (e.g. what it fell back to)."""
        return []

    def record(self) -> dict[str, Any]:
        """What this evaluator measured with (models, fallbacks and why), after :meth:`score`; eval.json
        keeps it as ``evaluators[name]["used"]``. Optional: an evaluator without it records nothing."""
        return {}


@dataclass
class EvalRun:
    """A finished run as evaluators see it: its run.json, handles, class words and inputs."""

    name: str
    path: Path
    info: dict
    class_words: list[str] | None = None  # one per handle, or None when the run has none
    inputs: tuple[Image.Image, list[np.ndarray]] | None = None  # loaded on first use
    sampling: dict[str, Any] | None = None  # the sampler and guidance its images are generated with (its family's by default)

    @property
    def handles(self) -> list[str]:
        return list(self.info["handles"])

    @property
    def concept_handles(self) -> list[str]:
        """The handles prompts combine: every handle but the background's."""
        return [h for h in self.handles if h != self.info.get("background")]

    def load_inputs(self) -> tuple[Image.Image, list[np.ndarray]]:
        """The input image and one mask per handle, as training saw them (``inputs/`` of the run)."""
        if self.inputs is None:
            self.inputs = load_inputs(self.path, len(self.handles))
        return self.inputs

    def require_class_words(self, evaluator: str) -> list[str]:
        if not self.class_words:
            raise BasError(
                f"{self.path} was run without --init-token, so {evaluator} does not know what its concepts are; "
                f"pass one --class-word per concept (such as --class-word dog --class-word ball)."
            )
        return self.class_words

    def class_prompt(self, prompt: str) -> str:
        """``prompt`` with every handle replaced by its concept's class word (the paper's prompt similarity)."""
        words = self.require_class_words("bas eval")
        index = {h: w for h, w in zip(self.handles, words)}
        return HANDLE_PATTERN.sub(lambda m: index.get(m.group(0), m.group(0)), prompt)


@dataclass
class Sample:
    """One image to score: the prompt it was generated from and which handles that prompt names."""

    run: str
    prompt: str
    concepts: tuple[int, ...]  # indices into the run's handles, in prompt order
    seed: int | None
    template: str | None
    path: Path

    def image(self) -> Image.Image:
        from bas.core.scene import open_image  # decompression bombs and damaged files are one line

        return open_image(self.path, "Image", "delete it and run bas eval again").convert("RGB")


@dataclass
class EvalConfig:
    """Options of one ``bas eval``.  Evaluator plugin options live in ``options`` under their click names."""

    runs: list[Path]
    out: Path
    evaluators: list[str] = field(default_factory=list)  # empty: each evaluator's default_for
    prompts: Path | None = None
    templates: str | None = None  # None: the evaluators' preferred set, else "paper"
    num_images: int = 4
    seed: int = 0
    batch_size: int = 1  # images sampled at once
    images: Path | None = None
    class_words: list[str] = field(default_factory=list)
    steps: int | None = None  # None: each run's base model's (50, the paper's; FLUX.1-schnell's 4)
    guidance: float | None = None  # None: each run's family's (7.5 for SD and SDXL, FLUX.1-dev's distilled 3.5)
    scheduler: str | None = None  # None: each run's family's (DDIM, the paper's, for SD and SDXL; flow-euler for FLUX)
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    quiet: bool = False
    plugins: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        checks.check_integer("num_images", self.num_images, 1, checks.MAX_IMAGES)
        checks.check_integer("batch_size", self.batch_size, 1, checks.MAX_IMAGES)
        checks.check_seed(self.seed, self.num_images)  # as generate checks it, before anything is read
        if self.steps is not None and self.steps < 1:
            raise BasError(f"--steps must be at least 1, not {self.steps}.")
        if self.guidance is not None:
            checks.check_finite("guidance", self.guidance)
        if not self.runs:
            raise BasError("No run to evaluate; pass one or more run folders, such as `bas eval runs/* --out eval`.")
        if self.images is not None and not Path(self.images).is_dir():
            raise BasError(f"--images {self.images} is not a folder; pass the folder holding the generated PNGs.")


def iter_chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in consecutive chunks of at most ``size`` (evaluators batch their model calls)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
