"""An example bas plugin: the ``outside-loss`` loss term and the ``colourfulness`` evaluator."""

from __future__ import annotations

import click
import numpy as np
from torch.nn import functional as F

from bas import hookimpl
from bas.core import checks
from bas.core.components import LossTerm, StepBatch
from bas.core.evaluation import Evaluator, Metric
from bas.core.training import latent_mask

BAS_PLUGIN_API = 1  # the bas plugin API this plugin was written for (bas.core.hookspecs.PLUGIN_API)


class OutsideLoss(LossTerm):
    """The denoising error outside the union of the shown concepts' masks (the masked diffusion loss
    counts only the inside), weighted by ``--outside-weight``: the background is learned too."""

    name = "outside-loss"

    def __init__(self, config):
        self.weight = config.options.get("outside_weight", 0.1)
        checks.check_positive("outside_weight", self.weight)

    def __call__(self, batch: StepBatch):
        pred, target = batch.model_pred.float(), batch.target.float()
        outside = 1 - latent_mask(batch.union_mask, pred)
        return F.mse_loss(pred * outside, target * outside)


class Colourfulness(Evaluator):
    """Hasler and Süsstrunk's colourfulness of each generated image (0 for grey; about 100 for vivid)."""

    name = "colourfulness"
    metrics = (Metric("colourfulness", "Hasler-Süsstrunk colourfulness of the generated image"),)

    def __init__(self, config):
        self.config = config  # bas.core.evaluation.EvalConfig; this evaluator has no options

    def score(self, run, samples):
        for sample in samples:
            yield {"colourfulness": colourfulness(np.asarray(sample.image(), dtype=np.float64))}


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Süsstrunk (2003): spread and mean of the opponent channels rg and yb of an (H, W, 3) image."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


@hookimpl
def bas_run_options():
    return [
        click.Option(
            ["--outside-weight"],
            type=float,
            default=0.1,
            show_default=True,
            help="Weight of the denoising error outside the concepts' masks (plugin example).",
        )
    ]


@hookimpl
def bas_register_loss_terms(register):
    register("outside-loss", OutsideLoss, description="MSE of the noise prediction outside the union mask")


@hookimpl
def bas_register_evaluators(register):
    register("colourfulness", Colourfulness, description="Hasler-Süsstrunk colourfulness of each image")
