"""attention-contrast: where a concept's mask is, its handle should out-attend the other handles shown.

Beyond the paper, against colour swaps between handles.  The paper's attention loss compares each
handle's map, divided by its max, with that handle's mask (an MSE per handle).  A map that is high
on its own mask *and* on a neighbour's costs little there, and bas's attention probe found exactly
that on bas-mini: after phase 1 a handle's attention share was higher on a neighbour's mask than on
its own (benchmarks/README.md, "Inside v2's extractions"), and those extractions drew concepts in
their neighbour's colour.  This term makes the handles compete for each pixel: over the pixels
that exactly one shown concept's mask covers (at the attention loss's side, area-averaged, at
least half covered), it is the cross-entropy of the handles' attention probabilities, renormalised
over the shown handles, against the pixel's owner.  A step that shows one concept adds nothing.

It reads the same maps as the attention loss (the same layers and side, ``--attention-res``); with
the attention loss on, it uses that term's capture, otherwise it installs its own.  Cost: none
beyond the attention loss's capture.

Measured on bas-mini v3's 16 test scenes (benchmarks/README.md, "Test scenes on bas-mini v3"), at
weight 0.05 it lowers swaps from 0.06 to 0.03 (suggestive, not shown) and costs adherence to a
requested background (-0.08, suggestive), so it is off by default.  Turn it on when a concept drawn
alone comes out in a neighbour's colour, and check that the backgrounds you ask for still come out.
"""

from __future__ import annotations

import click
import torch
from torch.nn import functional as F

from bas import hookimpl
from bas.core import checks
from bas.core.components import LossTerm, StepBatch
from bas.plugins.attention_loss import CrossAttentionLoss


def contrast_loss(probabilities: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The mean over owned pixels of ``-log(p_owner / sum_k p_k)``.

    ``probabilities`` (B, K, r, r) are the shown handles' attention probabilities; ``masks``
    (B, K, H, W) their concepts' masks at any resolution.  A pixel is owned when exactly one mask
    covers at least half of it; with fewer than two handles shown, or no owned pixel, the loss is 0
    (still part of the graph)."""
    if probabilities.shape[1] < 2:
        return probabilities.sum() * 0.0
    res = probabilities.shape[-1]
    cover = F.interpolate(masks.float(), size=(res, res), mode="area") >= 0.5  # (B, K, r, r)
    owned = (cover.sum(dim=1) == 1).float()  # (B, r, r)
    p = probabilities.float().clamp(min=1e-12)
    log_share = p.log() - p.sum(dim=1, keepdim=True).log()  # log of each handle's share of the shown handles' attention
    owner_log_share = (log_share * cover.float()).sum(dim=1)  # at owned pixels: the owner's
    # the mean over owned pixels without reading which they are (no branch on the values): a memory plan
    # (bas.memory) runs this on fake tensors; no owned pixel gives 0 / 1
    return -(owner_log_share * owned).sum() / owned.sum().clamp(min=1.0)


class AttentionContrastLoss(LossTerm):
    name = "attention-contrast"

    def __init__(self, config):
        self.weight = config.options.get("attention_contrast_weight", 0.05)
        checks.check_positive("attention_contrast_weight", self.weight)
        self.config = config
        self.source: CrossAttentionLoss | None = None
        self.own_capture = False

    def setup(self, run) -> None:
        shared = [t for t in run.resolved.loss_terms if isinstance(t, CrossAttentionLoss)]
        if shared:
            self.source, self.own_capture = shared[0], False
        else:  # the attention loss is off: capture the same maps ourselves
            self.source, self.own_capture = CrossAttentionLoss(self.config), True
            self.source.setup(run)

    def teardown(self, run) -> None:
        if self.own_capture and self.source is not None:
            self.source.teardown(run)
        self.source, self.own_capture = None, False

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        try:
            probabilities = self.source.token_probabilities(batch)
        finally:
            if self.own_capture:
                self.source.store.clear()
        return contrast_loss(probabilities, batch.masks)


@hookimpl
def bas_run_options():
    return [
        click.Option(
            ["--attention-contrast-weight"],
            type=float,
            default=0.05,
            show_default=True,
            help="Weight of the attention-contrast loss (--plugin attention-contrast).",
        ),
    ]


@hookimpl
def bas_register_loss_terms(register):
    register(
        "attention-contrast",
        AttentionContrastLoss,
        description="where one concept's mask is, its handle out-attends the other shown handles (against colour swaps)",
    )
