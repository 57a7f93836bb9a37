"""Checks of option values that need no model, shared by ``bas run``, ``bas generate`` and the API.

Each raises :class:`BasError` with one sentence naming the option and what it accepts, so a bad
command fails before anything slow happens.
"""

from __future__ import annotations

import math
import numbers

from bas.core.errors import BasError

# torch generators take seeds below 2**64; seeds count up from the one given (seed, seed+1, ...),
# so the largest accepted seed leaves room for that
MAX_SEED = 2**63 - 1
# the longest side of an image bas trains on or generates: 4x SDXL's 1024 px, and far below what
# would make a single step run for hours
MAX_SIDE = 4096
# images per prompt of one command: far more than anyone looks at, far fewer than a list of seeds
# that alone fills the memory
MAX_IMAGES = 10_000


def option_name(name: str) -> str:
    """``phase1_lr`` -> ``--phase1-lr``; a name that is not an option's (a file's field) stays as it is."""
    if name.startswith("-") or not name.replace("_", "").isalnum():
        return name
    return "--" + name.replace("_", "-")


def check_integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BasError(f"{option_name(name)} must be a whole number, not {value!r}.")
    if minimum is not None and value < minimum:
        least = "0 or more" if minimum == 0 else f"at least {minimum}"
        raise BasError(f"{option_name(name)} must be {least}, not {value}.")
    if maximum is not None and value > maximum:
        raise BasError(f"{option_name(name)} must be at most {maximum}, not {value}.")


def check_finite(name: str, value) -> None:
    """NaN and infinities pass ``value > 0`` style checks silently; refuse them by name."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
        raise BasError(f"{option_name(name)} must be a finite number, not {value}.")


def check_positive(name: str, value) -> None:
    check_finite(name, value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value <= 0:
        raise BasError(f"{option_name(name)} must be positive, not {value!r}.")


def check_seed(seed, count: int = 1, name: str = "seed") -> None:
    """A seed torch accepts, also for the ``count`` seeds counted up from it."""
    check_integer(name, seed, 0, MAX_SEED)
    if seed + max(count, 1) - 1 > MAX_SEED:
        raise BasError(f"{option_name(name)} {seed} plus {count - 1} more seeds passes {MAX_SEED}; use a smaller seed.")


def check_side(name: str, value, multiple: int = 8) -> None:
    """An image side in pixels: a positive multiple of ``multiple``, at most :data:`MAX_SIDE`."""
    check_integer(name, value)
    if value < multiple or value % multiple:
        raise BasError(f"{option_name(name)} must be a positive multiple of {multiple} (such as 512), not {value}.")
    if value > MAX_SIDE:
        raise BasError(f"{option_name(name)} must be at most {MAX_SIDE} pixels, not {value}.")


def check_all_finite(options: dict) -> None:
    """Every float among ``options`` (a plugin's as much as the core's), by its option name."""
    for name, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            check_finite(name, v)
