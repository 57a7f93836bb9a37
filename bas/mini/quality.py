"""bas-mini's base quality: for captions it was not trained on, how often the sample matches the caption.

``python -m bas.mini.quality`` samples every caption of two sets with a few seeds and reads each
image back from its pixels (:func:`bas.mini.metrics.read_image`):

* ``held-out pairs``: one object whose colour-shape pair never appears in training (a red
  triangle, a blue circle, a yellow square) on each background, plain and striped;
* ``new scenes``: fresh random one- and two-object training-distribution captions (drawn with
  another seed than the training set, so almost all are new as whole captions).

An object counts when an object of the caption's colour is in the image; its shape and texture
are then compared, and a sample is ``all correct`` when the background and every object's
colour, shape and texture match.  The result goes to ``quality.json`` beside the weights.
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


def score(scene: world.Scene, reading: metrics.ImageReading) -> dict[str, float]:
    found = [reading.find(colour=o.colour) for o in scene.objects]
    present = [f is not None for f in found]
    shape = [f is not None and f.shape == o.shape for f, o in zip(found, scene.objects)]
    texture = [f is not None and f.texture == o.texture for f, o in zip(found, scene.objects)]
    background = reading.background == scene.background
    return {
        "background": float(background),
        "object colour": float(np.mean(present)),
        "object shape": float(np.mean(shape)),
        "object texture": float(np.mean(texture)),
        "all correct": float(background and all(shape) and all(texture)),
    }


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


def evaluate(model: str | Path | None = None, seeds=(0, 1), steps: int = 25, guidance: float = 7.5, new_scenes: int = 40,
             sheet: Path | None = None) -> dict:
    from bas.core.model import load_pipeline

    pipe = load_pipeline(model or model_path(), torch.device("cpu"), torch.float32)
    result = {"model": str(model or "bas-mini"), "seeds": list(seeds), "steps": steps, "guidance": guidance, "sets": {}}
    t0 = time.perf_counter()
    tiles = []
    for name, scenes in (("held-out pairs", held_out_captions()), ("new scenes", new_scene_captions(new_scenes))):
        prompts = [s.caption() for s in scenes]
        images = sample(pipe, prompts, list(seeds), steps, guidance)
        scores = [score(scenes[i // len(seeds)], metrics.read_image(img)) for i, img in enumerate(images)]
        result["sets"][name] = {
            "captions": len(prompts), "samples": len(images),
            **{k: round(float(np.mean([s[k] for s in scores])), 3) for k in scores[0]},
        }
        tiles += images[: 8 * len(seeds)]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if sheet is not None:
        from bas.core import io
        from bas.core.generation import image_grid

        io.save_image(sheet, image_grid([tiles[i : i + 8] for i in range(0, len(tiles), 8)]))
    return result


@click.command()
@click.option("--model", default=None, help="Pipeline folder [default: the shipped bas-mini].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Where to write the result [default: quality.json beside the weights].")
@click.option("--seeds", default=2, show_default=True, help="Samples per caption.")
@click.option("--steps", default=25, show_default=True, help="DDIM steps.")
@click.option("--guidance", default=7.5, show_default=True)
@click.option("--threads", default=1, show_default=True, help="CPU threads for torch.")
def main(model, out, seeds, steps, guidance, threads):
    """Measure bas-mini's caption fidelity from pixels and write quality.json."""
    torch.set_num_threads(threads)
    folder = Path(model) if model else model_path()
    out = out or folder / "quality.json"
    result = evaluate(model, seeds=tuple(range(seeds)), steps=steps, guidance=guidance, sheet=out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=1) + "\n")
    click.echo(json.dumps(result["sets"], indent=1))


if __name__ == "__main__":
    main()
