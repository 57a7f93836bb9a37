"""bas-mini: a small text-to-image model of a procedural world, trained by the project and shipped with it.

Its world (:mod:`bas.mini.world`) is known exactly, so what it generates can be measured from
pixels (:mod:`bas.mini.metrics`): the base model's caption fidelity, and how faithfully
extraction captures concepts the base model cannot name (``benchmarks/fidelity.py``).
``bas demo`` uses it by default; ``--model bas-mini`` names it anywhere a model is taken.
"""

from __future__ import annotations

from pathlib import Path

NAME = "bas-mini"
WEIGHTS = Path(__file__).resolve().parent / "weights"


def model_path() -> Path:
    """The shipped pipeline folder (diffusers format)."""
    return WEIGHTS
