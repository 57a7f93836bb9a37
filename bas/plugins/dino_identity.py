"""dino-identity: the paper's identity similarity, DINO's CLS cosine of each concept masked in the input and in an image.

The generated image's mask comes from a segmenter prompted with the concept's class word (CLIPSeg:
one text-prompted model, no box or point to invent; SAM would need a box from it first), or, with
``--segmenter-model none``, the whole generated image is compared.
"""

from __future__ import annotations

import click
import numpy as np
from PIL import Image

from bas import hookimpl
from bas.core.errors import BasError
from bas.core.evaluation import Evaluator, Metric, iter_chunks

DEFAULT_MODEL = "facebook/dino-vitb16"  # the paper's DINO ViT-B/16
DEFAULT_SEGMENTER = "CIDAS/clipseg-rd64-refined"
NO_SEGMENTER = "none"
DINO = dict(what="DINO model", option="--dino-model", default=DEFAULT_MODEL)
SEGMENTER = dict(what="CLIPSeg segmenter", option="--segmenter-model", default=DEFAULT_SEGMENTER)
BATCH = 16


def masked(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` with everything outside ``mask`` (soft, any size; resized to the image) set to black."""
    m = np.asarray(mask, dtype=np.float32)
    if m.shape != (image.height, image.width):
        m = np.asarray(Image.fromarray((np.clip(m, 0, 1) * 255).round().astype(np.uint8), "L").resize(image.size, Image.BILINEAR),
                       dtype=np.float32) / 255.0
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) * np.clip(m, 0, 1)[..., None]
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


class DinoIdentity(Evaluator):
    """For each concept a prompt names: DINO CLS cosine between the run's input masked to that
    concept and the generated image masked to where the segmenter, prompted with the concept's
    class word, finds it; the image's score is the mean over its concepts."""

    name = "dino-identity"
    metrics = (Metric("identity_similarity", "DINO CLS cosine between each concept masked out of the input and masked out of the image "
                                             "(the paper's identity similarity), mean over the prompt's concepts"),)

    def __init__(self, config):
        self.model_name = config.options.get("dino_model") or DEFAULT_MODEL
        self.segmenter_name = config.options.get("segmenter_model") or DEFAULT_SEGMENTER
        self.threshold = config.options.get("segmenter_threshold", 0.5)
        if self.threshold is None or not 0 < self.threshold < 1:
            raise BasError(f"--segmenter-threshold must be between 0 and 1, not {self.threshold}.")
        self.whole_image = self.segmenter_name.lower() == NO_SEGMENTER
        self.reference: dict[tuple[str, int], object] = {}

    @classmethod
    def default_for(cls, info: dict) -> bool:
        from bas.mini import NAME

        return info.get("model") != NAME

    def check(self, run) -> None:
        from bas.core.hub import check_available

        run.load_inputs()
        check_available(self.model_name, **DINO)
        if not self.whole_image:
            run.require_class_words(self.name)
            check_available(self.segmenter_name, **SEGMENTER)

    def load(self, device) -> None:
        from transformers import AutoImageProcessor, ViTModel

        from bas.core.hub import from_pretrained

        self.processor = from_pretrained(AutoImageProcessor.from_pretrained, self.model_name, **DINO)
        self.model = from_pretrained(lambda s: ViTModel.from_pretrained(s, add_pooling_layer=False), self.model_name, **DINO).to(device).eval()
        if not self.whole_image:
            from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

            self.seg_processor = from_pretrained(CLIPSegProcessor.from_pretrained, self.segmenter_name, **SEGMENTER)
            self.segmenter = from_pretrained(CLIPSegForImageSegmentation.from_pretrained, self.segmenter_name, **SEGMENTER).to(device).eval()
        self.device = device

    def notes(self) -> list[str]:
        if self.whole_image:
            return ["no segmenter (--segmenter-model none): each generated image was compared whole with the masked input concept"]
        return [f"generated concepts masked by {self.segmenter_name} prompted with each concept's class word, threshold {self.threshold}"]

    # -- model calls ------------------------------------------------------------------------------
    def embed(self, images: list[Image.Image]):
        """DINO's CLS token (the last hidden state's first position) per image."""
        import torch

        inputs = self.processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(pixel_values=inputs["pixel_values"].to(self.device)).last_hidden_state
        return hidden[:, 0].float()

    def segment(self, images: list[Image.Image], words: list[str]) -> list[np.ndarray]:
        """A binary mask per (image, word): where the segmenter's probability reaches the threshold."""
        import torch

        inputs = self.seg_processor(text=words, images=images, padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = self.segmenter(**{k: v.to(self.device) for k, v in inputs.items()}).logits
        probs = torch.sigmoid(logits.float()).reshape(len(images), *logits.shape[-2:]).cpu().numpy()
        masks = []
        for image, p in zip(images, probs):
            resized = Image.fromarray((p * 255).round().astype(np.uint8), "L").resize(image.size, Image.BILINEAR)
            masks.append((np.asarray(resized, dtype=np.float32) / 255.0 >= self.threshold).astype(np.float32))
        return masks

    def input_embedding(self, run, k: int):
        key = (run.name, k)
        if key not in self.reference:
            image, masks = run.load_inputs()
            self.reference[key] = self.embed([masked(image, masks[k])])[0]
        return self.reference[key]

    def score(self, run, samples):
        from torch.nn import functional as F

        words = run.class_words
        for chunk in iter_chunks(samples, BATCH):
            pairs = [(i, k) for i, s in enumerate(chunk) for k in s.concepts]
            images = [s.image() for s in chunk]
            if pairs:
                if self.whole_image:
                    crops = [images[i] for i, _ in pairs]
                    found = [1.0] * len(pairs)
                else:
                    seg = self.segment([images[i] for i, _ in pairs], [words[k] for _, k in pairs])
                    crops = [masked(images[i], m) for (i, _), m in zip(pairs, seg)]
                    found = [float(m.mean()) for m in seg]
                generated = self.embed(crops)
            per_image: dict[int, dict] = {i: {} for i in range(len(chunk))}
            for j, (i, k) in enumerate(pairs):
                cosine = float(F.cosine_similarity(self.input_embedding(run, k), generated[j], dim=0).clamp(-1, 1))
                per_image[i][run.handles[k]] = (cosine, found[j])
            for i in range(len(chunk)):
                if not per_image[i]:
                    yield {}  # the prompt names no handle: no concept to compare
                    continue
                result = {"identity_similarity": float(np.mean([c for c, _ in per_image[i].values()]))}
                result["identity per concept"] = {h: round(c, 6) for h, (c, _) in per_image[i].items()}
                if not self.whole_image:
                    result["segmented fraction"] = {h: round(f, 4) for h, (_, f) in per_image[i].items()}
                yield result


@hookimpl
def bas_register_evaluators(register):
    register("dino-identity", DinoIdentity, description="DINO cosine of each concept masked in the input and in the image (paper: ViT-B/16)")


@hookimpl
def bas_eval_options():
    return [
        click.Option(["--dino-model"], default=DEFAULT_MODEL, show_default=True,
                     help="dino-identity's DINO ViT: a hub id or a local folder (offline: hf download ID --local-dir DIR)."),
        click.Option(["--segmenter-model"], default=DEFAULT_SEGMENTER, show_default=True,
                     help="CLIPSeg that finds each concept in a generated image by its class word; 'none' compares whole images."),
        click.Option(["--segmenter-threshold"], type=float, default=0.5, show_default=True,
                     help="Segmenter probability from which a pixel belongs to the concept."),
    ]
