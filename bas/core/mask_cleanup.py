"""Mask cleanup shared by every mask source: threshold, fill holes, dilate, erode, feather.

Masks rarely come clean: hand-drawn ones have gaps, SAM's have holes and jagged edges, COCO's
polygons are tight.  The same operations apply to whatever a mask source returns, in this order:
threshold, fill holes, dilate, erode, feather.  Distances are in pixels of the input image, so
an option means the same whatever size a source's masks have.  Masks may overlap; cleanup never
makes them exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import click
import numpy as np
from scipy import ndimage

from bas.core.errors import BasError


def cleanup_options() -> list[click.Option]:
    """The ``click`` options of :class:`MaskCleanup`, added to ``bas run`` and ``bas masks``."""
    return [
        click.Option(["--mask-threshold"], type=float, default=None, help="Binarise every mask: values >= T become 1, the rest 0 [default: keep soft values]."),
        click.Option(["--fill-holes"], is_flag=True, help="Fill holes enclosed by a mask (its pixels above 0.5)."),
        click.Option(["--mask-dilate"], type=float, default=0.0, show_default=True, help="Grow every mask by this many image pixels (a disk)."),
        click.Option(["--mask-erode"], type=float, default=0.0, show_default=True, help="Shrink every mask by this many image pixels, after --mask-dilate (equal values close gaps)."),
        click.Option(["--mask-feather"], type=float, default=0.0, show_default=True, help="Soften mask edges: a Gaussian blur with this standard deviation in image pixels, applied last."),
    ]


@dataclass
class MaskCleanup:
    """The cleanup settings of a run; all off by default."""

    threshold: float | None = None
    fill_holes: bool = False
    dilate: float = 0.0
    erode: float = 0.0
    feather: float = 0.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "MaskCleanup":
        """Settings from ``config.options``; absent options (the plugin is blocked) are off."""
        cleanup = cls(
            threshold=options.get("mask_threshold"),
            fill_holes=bool(options.get("fill_holes")),
            dilate=float(options.get("mask_dilate") or 0.0),
            erode=float(options.get("mask_erode") or 0.0),
            feather=float(options.get("mask_feather") or 0.0),
        )
        cleanup.check()
        return cleanup

    def check(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise BasError(f"--mask-threshold must be in (0, 1], not {self.threshold}; masks hold values from 0 to 1.")
        for name in ("dilate", "erode", "feather"):
            if getattr(self, name) < 0:
                raise BasError(f"--mask-{name} must be 0 or more pixels, not {getattr(self, name)}.")

    @property
    def active(self) -> bool:
        return self.threshold is not None or self.fill_holes or self.dilate > 0 or self.erode > 0 or self.feather > 0

    def describe(self) -> str:
        """The active settings as command-line options, for messages."""
        parts = [f"--mask-threshold {self.threshold:g}"] if self.threshold is not None else []
        parts += ["--fill-holes"] if self.fill_holes else []
        parts += [f"--mask-{name} {getattr(self, name):g}" for name in ("dilate", "erode", "feather") if getattr(self, name) > 0]
        return " ".join(parts)

    def apply(self, mask: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Clean one float mask in [0, 1].  ``scale`` is mask pixels per image pixel."""
        mask = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
        if self.threshold is not None:
            mask = (mask >= self.threshold).astype(np.float32)
        if self.fill_holes:
            core = mask > 0.5
            mask = np.where(ndimage.binary_fill_holes(core) & ~core, np.float32(1.0), mask)
        if self.dilate > 0:
            mask = disk_max(mask, self.dilate * scale)
        if self.erode > 0:
            mask = 1.0 - disk_max(1.0 - mask, self.erode * scale)
        if self.feather > 0:
            mask = ndimage.gaussian_filter(mask, sigma=self.feather * scale, mode="nearest")
        return np.clip(mask, 0.0, 1.0).astype(np.float32)


def disk_max(mask: np.ndarray, radius: float) -> np.ndarray:
    """Grey dilation with a disk of ``radius`` pixels, exact and fast for large radii.

    The disk is a stack of horizontal runs, one per row offset; a 1-D running maximum of each run's
    length (O(pixels) whatever the length) shifted by the offset covers it.  Beyond the border the
    edge values repeat, so an object touching the border is not eroded from it.
    """
    r = int(np.floor(radius))
    if r < 1:
        return mask
    h, w = mask.shape
    padded = np.pad(mask, r, mode="edge")
    out = np.zeros_like(mask)
    for dy in range(-r, r + 1):
        half = int(np.floor(np.sqrt(radius * radius - dy * dy)))
        rows = padded[r + dy : r + dy + h]
        run_max = ndimage.maximum_filter1d(rows, size=2 * half + 1, axis=1, mode="nearest")
        np.maximum(out, run_max[:, r : r + w], out=out)
    return out
