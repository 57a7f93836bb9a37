"""Full fine-tune of the denoiser and every text encoder in phase 2, as in the paper (needs far more memory)."""

from __future__ import annotations

import warnings
from pathlib import Path

from bas import hookimpl
from bas.core import io
from bas.core.components import WeightStrategy


class FullFineTune(WeightStrategy):
    name = "full"
    default_lr = 2e-6  # the paper's phase-2 learning rate
    freezes_base = False

    def __init__(self, config):
        from bas import mini

        # the docs' advice (docs/paper.md, "Prior preservation"): a full fine-tune of a large model is where a model
        # drifts from its prior; on bas-mini it was measured to change nothing, so nothing is said there
        # (a finished run's saved config, which export and generate pass, has no steps: nothing to advise there)
        if getattr(config, "phase2_steps", 0) and "prior-preservation" not in config.plugins and str(config.model) != mini.NAME:
            warnings.warn(
                "--plugin full fine-tunes every weight of the denoiser and text encoder(s) without prior preservation, so a "
                "large model can drift from what it knew; add --plugin prior-preservation to keep its prior (docs/paper.md, 'Prior preservation').",
                stacklevel=2,
            )

    def prepare(self, run):
        c = run.components
        params = list(c.denoiser.parameters())
        for encoder, embedding in zip(c.text_encoders, run.handle_embeddings):
            params += [p for p in encoder.model.parameters() if p is not embedding.base.weight and p is not embedding.handles]
        for p in params:
            p.requires_grad_(True)
        return params

    def save(self, run, out: Path) -> list[str]:
        from diffusers import DDIMScheduler

        from bas.exports.formats import save_pipeline

        c = run.components
        wrapped = [e.model.get_input_embeddings() for e in c.text_encoders]
        for encoder, embedding in zip(c.text_encoders, wrapped):  # plain embeddings with the handle rows, as loaders expect
            encoder.model.set_input_embeddings(embedding.to_embedding())
            encoder.model.config.vocab_size = embedding.num_embeddings
        try:
            pipe = run.family.pipeline_from_components(c, DDIMScheduler.from_config(c.noise_scheduler.config))
            with io.atomic_path(out / "pipeline", directory=True) as tmp:
                save_pipeline(pipe, tmp)  # loadable by transformers 4.x too
        finally:
            for encoder, embedding in zip(c.text_encoders, wrapped):
                encoder.model.set_input_embeddings(embedding)
        return ["pipeline/"]

    def load_pipeline(self, out: Path, run_info: dict, load):
        return load(out / "pipeline")


@hookimpl
def bas_register_weight_strategies(register):
    register("full", FullFineTune, description="full fine-tune of the denoiser + text encoder(s), as the paper; saves pipeline/")
