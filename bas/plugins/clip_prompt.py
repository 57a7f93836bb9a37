"""clip-prompt: the paper's prompt similarity, CLIP's image-text cosine with every handle replaced by its class word."""

from __future__ import annotations

import click

from bas import hookimpl
from bas.core.evaluation import Evaluator, Metric, iter_chunks

DEFAULT_MODEL = "openai/clip-vit-large-patch14"  # the paper's CLIP ViT-L/14
BATCH = 16


class ClipPrompt(Evaluator):
    """Cosine between CLIP's embedding of each image and of its prompt, with ``<assetK>`` replaced by
    concept K's class word (``--class-word``, else the run's ``--init-token`` words)."""

    name = "clip-prompt"
    metrics = (Metric("prompt_similarity", "CLIP cosine between the image and its prompt with each handle replaced by its class word "
                                           "(the paper's prompt similarity)"),)

    where = dict(what="CLIP model", option="--clip-model", default=DEFAULT_MODEL)

    def __init__(self, config):
        self.model_name = config.options.get("clip_model") or DEFAULT_MODEL

    @classmethod
    def default_for(cls, info: dict) -> bool:
        from bas.mini import NAME

        return info.get("model") != NAME  # bas-mini's 64 px world is measured from its pixels (bas-mini evaluator)

    def check(self, run) -> None:
        from bas.core.hub import check_available

        run.require_class_words(self.name)
        check_available(self.model_name, **self.where)

    def load(self, device) -> None:
        from transformers import CLIPModel, CLIPProcessor

        from bas.core.hub import from_pretrained

        where = self.where
        self.processor = from_pretrained(CLIPProcessor.from_pretrained, self.model_name, **where)
        self.model = from_pretrained(CLIPModel.from_pretrained, self.model_name, **where).to(device).eval()
        self.device = device

    def score(self, run, samples):
        import torch
        from torch.nn import functional as F

        for chunk in iter_chunks(samples, BATCH):
            texts = [run.class_prompt(s.prompt) for s in chunk]
            inputs = self.processor(text=texts, images=[s.image() for s in chunk], return_tensors="pt", padding=True, truncation=True)
            with torch.inference_mode():
                out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            cosines = F.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1).clamp(-1, 1)
            for cosine in cosines.tolist():
                yield {"prompt_similarity": cosine}


@hookimpl
def bas_register_evaluators(register):
    register("clip-prompt", ClipPrompt, description="CLIP image-text cosine with handles replaced by class words (paper: ViT-L/14)")


@hookimpl
def bas_eval_options():
    return [click.Option(["--clip-model"], default=DEFAULT_MODEL, show_default=True,
                         help="clip-prompt's CLIP: a hub id or a local folder (offline: hf download ID --local-dir DIR).")]
