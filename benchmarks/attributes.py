"""Identity by what a concept carries: which of its attributes an extraction draws, per attribute value.

The fidelity benchmark's *identity* asks for a concept's colour, shape, texture and core on one object. This
splits it by what the concept is: its colour, shape and texture (each one a caption names, or one no caption
names: bas-mini's ``NOVEL_*``), whether it has a core of a second colour, its masks and how many concepts share
its scene. Each cell is the mean over every single-concept sample (``a photo of <assetK>``: each extraction
seed, each generation seed) of the concepts that carry that value, with a 95% interval that resamples scenes
(a scene's samples are not independent). It reads the scores the benchmark keeps (``--keep``), so it runs on a
finished or a running benchmark without extracting anything::

    python -m benchmarks.attributes --keep benchmarks/results/fidelity-v3-test-kept --scenes test --test-scenes 44 \\
        --ablation full --ablation phase1-only --prior-seeds 32 --out benchmarks/results/attributes-v3-test.json

``--prior-seeds N`` also samples the base model N times for each caption of :data:`PRIOR_CAPTIONS` and counts
what no caption names in what it draws: where a handle, which moves only the text side, starts from.
"""

from __future__ import annotations

import datetime
import json
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

from bas.mini import metrics, world
from benchmarks import fidelity
from benchmarks.commandline import Command

PARTS = ("identity", "identity_colour", "identity_shape", "identity_texture", "identity_core", "count", "swap")
NAMED = {"colour": world.COLOURS, "shape": world.SHAPES, "texture": world.TEXTURES}


def concept_keys(obj, masks: str, concepts: int) -> list[tuple[str, str]]:
    """The rows a concept counts in: ``(attribute, value)``."""
    keys = []
    for attribute in ("colour", "shape", "texture"):
        value = getattr(obj, attribute)
        keys += [(attribute, value), (f"{attribute} named", "named" if value in NAMED[attribute] else "no caption names it")]
    keys += [("core", "a second colour's core" if obj.inner else "one colour"), ("masks", masks), ("concepts in the scene", str(concepts))]
    keys.append(("a core or dots", "yes" if obj.inner or obj.texture == "dotted" else "neither"))
    return keys


def read_samples(keep: Path, scenes: dict, ablation: str) -> list[dict]:
    """Every single-concept sample of ``ablation`` kept in ``keep``: its scene, its keys and its scores."""
    samples = []
    for name, bench in scenes.items():
        objects = bench.scene().objects
        for path in sorted((keep / "scores").glob(f"{name}--{ablation}--e*.json")):
            if path.stem.split("--")[1] != ablation:
                continue
            for image in fidelity.read_kept(path)["images"]:  # a damaged file: one line, before any table
                prompt = image["prompt"]
                shown = [int(h.split(">")[0]) for h in prompt.split("<asset")[1:]]
                if len(shown) != 1 or prompt != f"a photo of <asset{shown[0]}>":
                    continue
                obj = objects[shown[0]]
                samples.append(
                    {
                        "scene": name,
                        "keys": concept_keys(obj, bench.masks, len(objects)),
                        "scores": {p: float(image["scores"][p]) for p in PARTS if p in image["scores"]},
                    }
                )
    return samples


def table(samples: list[dict], resamples: int = 2000, seed: int = 0) -> list[dict]:
    """One row per ``(attribute, value)``: samples, scenes, and per part its mean and the 95% interval of a
    bootstrap that resamples scenes (with all their samples)."""
    rows = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # key -> part -> scene -> values
    for s in samples:
        for key in s["keys"]:
            for part, value in s["scores"].items():
                rows[key][part][s["scene"]].append(value)
    rng = np.random.default_rng(seed)
    out = []
    for (attribute, value), parts in sorted(rows.items()):
        first = next(iter(parts.values()))
        row = {"attribute": attribute, "value": value, "samples": sum(len(v) for v in first.values()), "scenes": len(first)}
        for part, by_scene in parts.items():
            sums = np.array([sum(v) for v in by_scene.values()])
            counts = np.array([len(v) for v in by_scene.values()])
            mean = float(sums.sum() / counts.sum())
            picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
            boot = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
            row[part] = {"mean": round(mean, 4), "interval": [round(float(np.quantile(boot, 0.025)), 4), round(float(np.quantile(boot, 0.975)), 4)]}
        out.append(row)
    return out


def markdown(rows: list[dict], parts=("identity", "identity_colour", "identity_shape", "identity_texture", "identity_core")) -> str:
    head = "| attribute | value | samples (scenes) | " + " | ".join(p.replace("identity_", "") for p in parts) + " |"
    lines = [head, "|" + "---|" * (3 + len(parts))]
    for r in rows:
        cells = [f"{r[p]['mean']:.2f} [{r[p]['interval'][0]:.2f}, {r[p]['interval'][1]:.2f}]" if p in r else "-" for p in parts]
        lines.append(f"| {r['attribute']} | {r['value']} | {r['samples']} ({r['scenes']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# captions whose words leave the unnamed attributes open: a named colour and shape, and "thing" (no colour word,
# or no shape word): what the base model draws for them is what a handle, which moves only the text side, starts from
PRIOR_CAPTIONS = (
    "a photo of a red square on a grey background",
    "a photo of a blue circle on a black background",
    "a photo of a red thing on a black background",
    "a photo of a thing on a grey background",
)


def unnamed_counts(images) -> dict[str, int]:
    """How many of ``images`` (bas-mini's, read from their pixels) draw their largest object dotted, with a second
    colour's core, in a shape no caption names, in a colour no caption names, and how many draw none."""
    counts = {"samples": 0, "dotted": 0, "core": 0, "unnamed shape": 0, "unnamed colour": 0, "no object": 0}
    for image in images:
        counts["samples"] += 1
        objects = metrics.read_image(image).objects
        if not objects:
            counts["no object"] += 1
            continue
        o = objects[0]
        counts["dotted"] += o.texture == "dotted"
        counts["core"] += o.inner is not None
        counts["unnamed shape"] += o.shape in world.NOVEL_SHAPES
        counts["unnamed colour"] += o.colour in world.NOVEL_COLOURS
    return counts


def base_prior(seeds: int, steps: int = 25, guidance: float = 7.5) -> dict[str, dict[str, int]]:
    """:func:`unnamed_counts` of the base model's samples of each of :data:`PRIOR_CAPTIONS` (seeds 0..N-1, DDIM as
    the benchmark samples)."""
    import torch

    from bas.core.model import load_pipeline
    from bas.mini import quality

    pipe = load_pipeline("bas-mini", torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return {c: unnamed_counts(quality.sample(pipe, [c], list(range(seeds)), steps, guidance)) for c in PRIOR_CAPTIONS}


def prior_markdown(prior: dict[str, dict[str, int]]) -> str:
    keys = ("dotted", "core", "unnamed shape", "unnamed colour")
    lines = ["| caption | samples | " + " | ".join(keys) + " |", "|" + "---|" * (2 + len(keys))]
    for caption, c in prior.items():
        lines.append(f"| {caption} | {c['samples']} | " + " | ".join(str(c[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


@click.command(cls=Command)
@click.option("--keep", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="The benchmark's --keep folder.")
@click.option("--scenes", "scene_set_name", type=click.Choice(fidelity.SCENE_SETS), default="test", show_default=True)
@click.option("--test-scenes", type=int, default=None, help="As the benchmark's: how many test scenes were drawn.")
@click.option(
    "--operating-point",
    type=click.Path(path_type=Path, dir_okay=False),
    default=fidelity.OPERATING_POINT,
    show_default="benchmarks/operating-point.json",
    help="As the benchmark's: the operating point whose test scenes these are.",
)
@click.option("--ablation", "ablations", multiple=True, default=("full",), show_default=True)
@click.option(
    "--prior-seeds",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also sample the base model this many times per caption of PRIOR_CAPTIONS and count the unnamed attributes it draws.",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the rows as JSON (with the markdown tables).")
def main(keep, scene_set_name, test_scenes, operating_point, ablations, prior_seeds, out):
    """Identity and its parts per attribute value, from kept scores (see the module docstring)."""
    from bas.core import io

    if out:
        io.check_output_file(out, "--out")  # before the base model's samples, not after them
    scenes, record = fidelity.scene_set(scene_set_name, operating_point, count=test_scenes)
    result = {"date": datetime.date.today().isoformat(), "git": fidelity.git_revision(), "keep": str(keep), "scene_set": record, "ablations": {}}
    for ablation in ablations:
        samples = read_samples(keep, scenes, ablation)
        if not samples:
            raise click.ClickException(f"{keep} keeps no scores of '{ablation}'; name an ablation the benchmark ran.")
        rows = table(samples)
        kept = sorted({s["scene"] for s in samples})
        result["ablations"][ablation] = {"scenes": kept, "rows": rows, "markdown": markdown(rows)}
        click.echo(f"## {ablation}: {len(samples)} single-concept samples of {len(kept)} scenes\n\n{markdown(rows)}")
    if prior_seeds:
        prior = base_prior(prior_seeds)
        result["base_prior"] = {"seeds": prior_seeds, "steps": 25, "guidance": 7.5, "counts": prior, "markdown": prior_markdown(prior)}
        click.echo(f"## the base model, {prior_seeds} seeds per caption\n\n{prior_markdown(prior)}")
    if out:
        io.write_text(Path(out), json.dumps(result, indent=1) + "\n")  # whole or not at all, as every result file
        click.echo(f"Wrote {out}", err=True)


if __name__ == "__main__":
    main()
