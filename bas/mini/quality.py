"""bas-mini's base quality: for captions it was not trained on, how often the sample matches the caption.

``python -m bas.mini.quality`` samples every caption of two sets with a few seeds and reads each
image back from its pixels (:func:`bas.mini.metrics.read_image`):

* ``held-out pairs``: one object whose colour-shape pair never appears in training (a red
  triangle, a blue circle, a yellow square) on each background, plain and striped;
* ``new scenes``: fresh random one- and two-object training-distribution captions (drawn with
  another seed than the training set, so almost all are new as whole captions).

An object counts when an object of the caption's colour is in the image; its shape and texture
are then compared as the caption names them, and a sample is ``all correct`` when the background
and every object's colour, shape and texture match the caption.  A caption names a texture only
when it is striped and never names a core, so for "a red square" a dotted red square, or one with
a core, is right: training pairs that caption with all of them.  ``exact`` is the stricter
reading (plain and without a core where the caption says nothing), for comparison.

It also measures the VAE alone (``vae reconstruction``): scenes from the whole world (every
unnamed attribute included: the colours, the shape family, the dotted texture and two-colour
objects, which no caption names but extraction must capture) are encoded and decoded, and the
reconstruction is read back the same way; ``dotted kept``, ``unnamed shape kept``, ``core
kept`` and ``unnamed colour kept`` are the fractions of the objects carrying each that still
read as such.

The result goes to ``quality.json`` beside the weights, and a sheet to ``quality.png``: two rows
of held-out-pair samples and two of new-scene samples (each caption's seeds side by side), then
drawn whole-world scenes and their VAE reconstructions in alternate rows.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import click
import numpy as np
import torch

from bas.mini import metrics, model_path, world

ATTRIBUTES = ("background", "object colour", "object shape", "object texture", "all correct", "exact")


def held_out_captions() -> list[world.Scene]:
    scenes = []
    for colour, shape in world.HELD_OUT:
        for background in world.BACKGROUNDS:
            if background == colour:
                continue
            for texture in world.TEXTURES:
                scenes.append(world.Scene(background, [world.Shape(colour, shape, texture, (0, 0, 0, 0))]))
    return scenes


def new_scene_captions(count: int, seed: int = 1234) -> list[world.Scene]:
    rng = random.Random(seed)
    return [world.random_scene(rng, counts=(1, 2), count_weights=(0.5, 0.5)) for _ in range(count)]


def reconstruction_scenes(count: int, seed: int = 4321) -> list[world.Scene]:
    """The demo's novel scenes, then ``count`` more from the whole world (every unnamed attribute often, objects apart)."""
    rng = random.Random(seed)
    scenes = [world.random_scene(rng, objects=objects, background=bg) for bg, objects in world.NOVEL_SCENES.values()]
    while len(scenes) < count:
        scenes.append(world.any_scene(rng, touching=0.0))
    return scenes


UNNAMED = {  # what the VAE must keep of each unnamed attribute: (which objects carry it, whether the reading kept it)
    "dotted kept": (lambda o: o.texture == "dotted", lambda o, f: f.texture == "dotted"),
    "unnamed shape kept": (lambda o: o.shape in world.NOVEL_SHAPES, lambda o, f: f.shape == o.shape),
    "core kept": (lambda o: o.inner is not None, lambda o, f: f.inner == o.inner),
    "unnamed colour kept": (lambda o: o.colour in world.NOVEL_COLOURS, lambda o, f: True),
}


def named_match(asked: world.Shape, found: metrics.ObjectReading) -> tuple[bool, bool]:
    """Whether ``found`` has the shape and texture a caption of ``asked`` names, and no more.  A training
    caption says "striped" or nothing (a plain and a dotted object have the same caption), never names a
    core, and calls an unnamed shape a "thing" (either of :data:`world.NOVEL_SHAPES`); training pairs each
    caption with every object it describes, so a model that draws a dotted square or one with a core for
    "a red square" draws what it was asked.  A texture other than plain in ``asked`` (a prompt that says
    "dotted") must be drawn as asked."""
    shape = found.shape == asked.shape if asked.shape in world.SHAPES else found.shape in world.NOVEL_SHAPES
    texture = found.texture in ("plain", "dotted") if asked.texture == "plain" else found.texture == asked.texture
    return shape, texture


def score(scene: world.Scene, reading: metrics.ImageReading, exact: bool = False) -> dict[str, float]:
    """How ``reading`` matches ``scene``: per attribute, and ``all correct`` when the background and every
    object's colour, shape and texture match.  By default shape and texture are judged as the scene's
    caption names them (:func:`named_match`) and ``exact`` is the stricter reading (every attribute as drawn,
    the core included); with ``exact=True`` (a reconstruction, which must keep everything) both are strict."""
    found = [reading.find(colour=o.colour) for o in scene.objects]
    present = [f is not None for f in found]
    strict = [f is not None and f.shape == o.shape and f.texture == o.texture and f.inner == o.inner for f, o in zip(found, scene.objects)]
    if exact:
        shape = [f is not None and f.shape == o.shape for f, o in zip(found, scene.objects)]
        texture = [f is not None and f.texture == o.texture for f, o in zip(found, scene.objects)]
    else:
        named = [named_match(o, f) if f is not None else (False, False) for f, o in zip(found, scene.objects)]
        shape, texture = [n[0] for n in named], [n[1] for n in named]
    background = reading.background == scene.background
    right = background and all(shape) and all(texture)
    return {
        "background": float(background),
        "object colour": float(np.mean(present)),
        "object shape": float(np.mean(shape)),
        "object texture": float(np.mean(texture)),
        "all correct": float(right and (not exact or all(strict))),
        "exact": float(background and all(strict)),
    }


def summarise(scores: list[dict[str, float]], captions: list[int] | None = None) -> dict:
    """Each attribute's mean over the samples and, with ``captions`` (the caption of each sample), its
    95% bootstrap interval drawing whole captions (a caption's seeds move together)."""
    from bas.evaluation.stats import bootstrap_interval

    result: dict = {k: round(float(np.mean([s[k] for s in scores])), 3) for k in ATTRIBUTES}
    if captions is not None:
        result["95% interval"] = {k: [round(v, 3) for v in bootstrap_interval([s[k] for s in scores], clusters=captions)] for k in ATTRIBUTES}
    return result


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 16):
    """One image per (prompt, seed), in that order."""
    jobs = [(p, s) for p in prompts for s in seeds]
    images = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        generators = [torch.Generator().manual_seed(s) for _, s in chunk]
        out = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=generators)
        images += out.images
    return images


@torch.no_grad()
def reconstruct(vae, images: list) -> list:
    """Each image (PIL, 64 px) through the VAE's encoder mean and its decoder."""
    from PIL import Image

    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images]) / 127.5 - 1
    vae = vae.float().eval()
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    y = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in y]


def vae_quality(vae, count: int = 120) -> tuple[dict, list, list]:
    """Read back reconstructions of whole-world scenes: per-attribute rates, ``dotted kept``, pixel MSE."""
    scenes = reconstruction_scenes(count)
    originals = [world.render(s)[0] for s in scenes]
    recons = reconstruct(vae, originals)
    readings = [metrics.read_image(r) for r in recons]
    mse = np.mean([((np.asarray(a, np.float32) - np.asarray(b, np.float32)) / 127.5) ** 2 for a, b in zip(originals, recons)])
    result = {"scenes": len(scenes), **summarise([score(s, r, exact=True) for s, r in zip(scenes, readings)])}
    for name, (carries, kept) in UNNAMED.items():
        found = [(o, r.find(colour=o.colour)) for s, r in zip(scenes, readings) for o in s.objects if carries(o)]
        result[name.replace(" kept", " objects")] = len(found)
        result[name] = round(float(np.mean([f is not None and kept(o, f) for o, f in found])), 3) if found else None
    result["mse"] = round(float(mse), 5)
    return result, originals, recons


def evaluate(model: str | Path | None = None, seeds=(0, 1), steps: int = 25, guidance: float = 7.5, new_scenes: int = 40,
             sheet: Path | None = None) -> dict:
    from bas.core.model import load_pipeline

    pipe = load_pipeline(model or model_path(), torch.device("cpu"), torch.float32)
    result = {"model": str(model or "bas-mini"), "seeds": list(seeds), "steps": steps, "guidance": guidance, "sets": {}}
    t0 = time.perf_counter()
    rows = []
    for name, scenes in (("held-out pairs", held_out_captions()), ("new scenes", new_scene_captions(new_scenes))):
        prompts = [s.caption() for s in scenes]
        images = sample(pipe, prompts, list(seeds), steps, guidance)
        scores = [score(scenes[i // len(seeds)], metrics.read_image(img)) for i, img in enumerate(images)]
        captions = [i // len(seeds) for i in range(len(images))]
        result["sets"][name] = {"captions": len(prompts), "samples": len(images), **summarise(scores, captions)}
        per_row = max(1, 8 // len(seeds))
        rows += [images[i : i + per_row * len(seeds)] for i in range(0, 2 * per_row * len(seeds), per_row * len(seeds))]
    result["sets"]["vae reconstruction"], originals, recons = vae_quality(pipe.vae)
    rows += [originals[:8], recons[:8], originals[8:16], recons[8:16]]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if sheet is not None:
        from bas.core import io
        from bas.generation.generate import image_grid

        io.save_image(sheet, image_grid(rows))
    return result


@click.command()
@click.option("--model", default=None, help="Pipeline folder [default: the shipped bas-mini].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Where to write the result [default: quality.json beside the weights].")
@click.option("--seeds", default=2, show_default=True, help="Samples per caption.")
@click.option("--steps", default=25, show_default=True, help="DDIM steps.")
@click.option("--guidance", default=7.5, show_default=True)
@click.option("--new-scenes", default=40, show_default=True, help="Captions in the new-scenes set.")
@click.option("--threads", default=1, show_default=True, help="CPU threads for torch.")
def main(model, out, seeds, steps, guidance, new_scenes, threads):
    """Measure bas-mini's caption fidelity and its VAE's, from pixels, and write quality.json and quality.png."""
    from bas.core import io

    torch.set_num_threads(threads)
    folder = Path(model) if model else model_path()
    out = out or folder / "quality.json"
    result = evaluate(model, seeds=tuple(range(seeds)), steps=steps, guidance=guidance, new_scenes=new_scenes, sheet=out.with_suffix(".png"))
    io.write_json(out, result)
    click.echo(json.dumps(result["sets"], indent=1))


if __name__ == "__main__":
    main()
