"""bas-mini: fidelity read from pixels for runs on bas-mini, whose world is flat colours from a known palette.

The concepts' colour, shape and texture are read from the run's input image inside each mask, and
every generated image is read back the same way (:mod:`bas.mini.metrics`), so no learned model
judges anything.  ``benchmarks/fidelity.py`` scores with this evaluator; its numbers are
``bas eval``'s.  Per image, what applies to its prompt:

* ``identity`` (one concept named): an object of the concept's colour with its shape, texture and
  core (the second colour of a two-colour object, or none); ``identity_colour`` that colour
  anywhere, ``identity_shape`` / ``identity_texture`` / ``identity_core`` the largest object's shape /
  texture / core;
* ``swap`` (one concept named, others in the scene): no object of its colour, but one of another
  concept's colour: the concept drawn with its neighbour's colour (lower is better);
* ``count`` (one concept named): exactly one object drawn;
* ``composition`` (two or more named): the fraction of them shown with their colour and shape;
* ``leakage`` (some concepts not named): the fraction of the others whose colour appears;
* ``adherence`` (the prompt asks for "on a COLOUR background" other than the input's): that background;
* ``entanglement`` (the same prompts): the share of the image's pixels in the input's background
  colour, which a concept that learned its surroundings carries into the new background;
* ``prior`` (no handle named, the prompt a caption of the world such as "a photo of a red circle on
  a blue background"): the image is all correct, as ``python -m bas.mini.quality`` counts it: what
  the base model could draw and extraction should not take away (prior preservation's purpose).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from bas import hookimpl
from bas.core.errors import BasError
from bas.core.evaluation import Evaluator, Metric

TEMPLATES = {"bas-mini": ("a photo of {}", "a photo of {} on a yellow background", "a photo of {} on a green background")}
BACKGROUND_REQUEST = re.compile(r"\bon an? (\w+) background\b")


@dataclass(frozen=True)
class Concept:
    colour: str
    shape: str
    texture: str
    inner: str | None = None  # the core's colour, for a two-colour object


def read_concepts(image, masks) -> tuple[str, list[Concept]]:
    """The input's background colour and, per mask, the object under it (the one the mask covers most)."""
    from PIL import Image

    from bas.mini import metrics

    reading = metrics.read_image(image)
    size = 64  # metrics reads at the world's size
    concepts = []
    for k, mask in enumerate(masks):
        m = np.asarray(mask, dtype=np.float32)
        if m.shape != (size, size):
            m = np.asarray(Image.fromarray((np.clip(m, 0, 1) * 255).astype(np.uint8), "L").resize((size, size), Image.BOX), dtype=np.float32) / 255
        cover = [float(m[o.box[1]:o.box[3], o.box[0]:o.box[2]].sum()) for o in reading.objects]
        if not cover or max(cover) <= 0:
            raise BasError(f"mask{k} of the input covers no object of the bas-mini world (flat shapes on a flat background); "
                           f"the bas-mini evaluator measures runs on bas-mini scenes only.")
        o = reading.objects[int(np.argmax(cover))]
        concepts.append(Concept(o.colour, o.shape, o.texture, o.inner))
    return reading.background, concepts


def asked_background(prompt: str) -> str | None:
    from bas.mini.world import PALETTE

    m = BACKGROUND_REQUEST.search(prompt)
    return m.group(1) if m and m.group(1) in PALETTE else None


def score_reading(reading, concepts: list[Concept | None], shown: tuple[int, ...], background: str, asked: str | None,
                  background_share: float | None = None) -> dict[str, float]:
    """The metrics that apply to one read-back image of a prompt naming the concepts ``shown``
    (indices into ``concepts``; a ``None`` concept, the background handle's, is left out).
    ``background_share``: the share of the image's pixels in the input's background colour."""
    scores: dict[str, float] = {}
    shown = tuple(k for k in shown if concepts[k] is not None)
    others = [j for j, c in enumerate(concepts) if c is not None and j not in shown]
    if len(shown) == 1:
        c = concepts[shown[0]]
        found = reading.find(colour=c.colour)
        largest = reading.objects[0] if reading.objects else None  # what the handle drew, whatever its colour
        scores["identity"] = float(found is not None and (found.shape, found.texture, found.inner) == (c.shape, c.texture, c.inner))
        scores["identity_colour"] = float(found is not None)
        scores["identity_shape"] = float(largest is not None and largest.shape == c.shape)
        scores["identity_texture"] = float(largest is not None and largest.texture == c.texture)
        scores["identity_core"] = float(largest is not None and largest.inner == c.inner)
        scores["count"] = float(len(reading.objects) == 1)
        if others:  # its colour nowhere, a neighbour's somewhere: the handle drew the neighbour's colour
            scores["swap"] = float(found is None and any(reading.find(colour=concepts[j].colour) is not None for j in others))
    elif len(shown) > 1:
        scores["composition"] = float(np.mean([reading.find(colour=concepts[k].colour, shape=concepts[k].shape) is not None for k in shown]))
    if shown and others:
        scores["leakage"] = float(np.mean([reading.find(colour=concepts[j].colour) is not None for j in others]))
    if asked is not None and asked != background:
        scores["adherence"] = float(reading.background == asked)
        if background_share is not None:
            scores["entanglement"] = float(background_share)
    return scores


class BasMini(Evaluator):
    """Reads concepts from the run's input and each generated image from its pixels."""

    name = "bas-mini"
    metrics = (
        Metric("identity", "one concept named: an object of its colour with its shape, texture and core"),
        Metric("composition", "several named: the fraction shown with their colour and shape"),
        Metric("adherence", "the background the prompt asks for ('on a yellow background')"),
        Metric("leakage", "the fraction of the concepts not named whose colour appears", higher_is_better=False),
        Metric("entanglement", "another background asked: the share of pixels in the input's background colour", higher_is_better=False),
        Metric("prior", "no handle, a caption of the world: background and every object's colour, shape and texture right"),
        Metric("identity_colour", "one concept named: its colour appears"),
        Metric("identity_shape", "one concept named: the largest object has its shape"),
        Metric("identity_texture", "one concept named: the largest object has its texture"),
        Metric("identity_core", "one concept named: the largest object has its core (a second colour inside it), or none as it has none"),
        Metric("swap", "one concept named: its colour nowhere, another concept's colour drawn", higher_is_better=False),
        Metric("count", "one concept named: exactly one object drawn"),
    )
    templates = TEMPLATES
    default_templates = "bas-mini"

    def __init__(self, config=None):
        self.concepts: dict[str, tuple[str, list[Concept | None]]] = {}

    @classmethod
    def default_for(cls, info: dict) -> bool:
        from bas.mini import NAME

        return info.get("model") == NAME

    def concepts_of(self, run) -> tuple[str, list[Concept | None]]:
        """The input's background and a concept per handle (None for the background handle)."""
        if run.name not in self.concepts:
            image, masks = run.load_inputs()
            keep = [i for i, h in enumerate(run.handles) if h in run.concept_handles]
            try:
                background, read = read_concepts(image, [masks[i] for i in keep])
            except BasError as exc:
                raise BasError(f"{run.path}: {exc}") from None
            concepts: list[Concept | None] = [None] * len(run.handles)
            for i, c in zip(keep, read):
                concepts[i] = c
            self.concepts[run.name] = (background, concepts)
        return self.concepts[run.name]

    def check(self, run) -> None:
        self.concepts_of(run)

    def score(self, run, samples):
        from bas.mini import metrics, world
        from bas.mini.quality import score as caption_score

        background, concepts = self.concepts_of(run)
        for s in samples:
            image = s.image()
            if not s.concepts:
                asked = world.parse_caption(s.prompt)
                yield {"prior": caption_score(asked, metrics.read_image(image))["all correct"]} if asked else {}
                continue
            asked = asked_background(s.prompt)
            share = metrics.colour_share(image, background) if asked is not None and asked != background else None
            yield score_reading(metrics.read_image(image), concepts, s.concepts, background, asked, share)


@hookimpl
def bas_register_evaluators(register):
    register("bas-mini", BasMini, description="identity, composition, adherence, leakage, swap, count read from pixels (runs on bas-mini)")


@hookimpl
def bas_model_path(name):
    """``bas-mini`` is the model shipped with bas (:mod:`bas.mini`); the lookup every ``--model`` goes through."""
    from bas import mini

    return mini.model_path() if name == mini.NAME else None


@hookimpl
def bas_model_settings(name):
    """bas-mini's operating point (:data:`bas.mini.RECOMMENDED`), for the ``bas run`` options a user leaves out."""
    from bas import mini

    return dict(mini.RECOMMENDED) if name == mini.NAME else None
