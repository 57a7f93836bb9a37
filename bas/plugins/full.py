"""Full fine-tune of the UNet and text encoder in phase 2, as in the paper (needs far more memory)."""

from __future__ import annotations

from pathlib import Path

from bas import hookimpl
from bas.core import io
from bas.core.components import WeightStrategy


class FullFineTune(WeightStrategy):
    name = "full"
    default_lr = 2e-6  # the paper's phase-2 learning rate
    freezes_base = False

    def __init__(self, config):
        pass

    def prepare(self, run):
        c = run.components
        params = [p for p in c.unet.parameters()]
        handle_base = run.handle_embedding.base.weight
        params += [p for p in c.text_encoder.parameters() if p is not handle_base and p is not run.handle_embedding.handles]
        for p in params:
            p.requires_grad_(True)
        return params

    def save(self, run, out: Path) -> list[str]:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        from bas.core.formats import save_pipeline

        c = run.components
        te = c.text_encoder
        wrapped = te.get_input_embeddings()
        te.set_input_embeddings(wrapped.to_embedding())  # a plain embedding with the handle rows, as loaders expect
        te.config.vocab_size = len(c.tokenizer)
        try:
            pipe = StableDiffusionPipeline(
                vae=c.vae, text_encoder=te, tokenizer=c.tokenizer, unet=c.unet,
                scheduler=DDIMScheduler.from_config(c.noise_scheduler.config),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            with io.atomic_path(out / "pipeline", directory=True) as tmp:
                save_pipeline(pipe, tmp)  # loadable by transformers 4.x too
        finally:
            te.set_input_embeddings(wrapped)
        return ["pipeline/"]

    def load_pipeline(self, out: Path, run_info: dict, load):
        return load(out / "pipeline")


@hookimpl
def bas_register_weight_strategies(register):
    register("full", FullFineTune, description="full fine-tune of UNet + text encoder, as the paper; saves pipeline/")
