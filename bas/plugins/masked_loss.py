"""The masked diffusion loss: the denoising error counted only inside the union of the shown concepts' masks."""

from __future__ import annotations

import click
from torch.nn import functional as F

from bas import hookimpl
from bas.core.components import LossTerm, StepBatch
from bas.core.training import latent_mask


class MaskedDiffusionLoss(LossTerm):
    name = "diffusion"

    def __init__(self, config):
        self.masked = config.options.get("mask_loss", True)
        self.normalize = config.options.get("normalize_mask_area", False)

    def __call__(self, batch: StepBatch):
        pred, target = batch.model_pred.float(), batch.target.float()
        if not self.masked:
            return F.mse_loss(pred, target)
        mask = latent_mask(batch.union_mask, pred)
        loss = F.mse_loss(pred * mask, target * mask, reduction="sum" if self.normalize else "mean")
        if self.normalize:  # per-element mean over the masked area only, so small objects are not weaker
            loss = loss / (mask.sum() * pred.shape[1]).clamp(min=1e-6)
        return loss


@hookimpl
def bas_run_options():
    return [
        click.Option(["--mask-loss/--no-mask-loss"], default=True, help="Mask the diffusion loss by the concepts' union (off: plain loss, an ablation)."),
        click.Option(["--normalize-mask-area"], is_flag=True, default=False, help="Average the masked loss over the masked area, not the whole latent."),
    ]


@hookimpl
def bas_register_loss_terms(register):
    register("diffusion", MaskedDiffusionLoss, description="MSE of the noise prediction inside the union mask")
