"""Fidelity of extraction on bas-mini, with the paper's ablations, measured from pixels.

``python -m benchmarks.fidelity`` extracts every scene of :data:`SCENES` (2-3 objects whose
colours or textures bas-mini was never told about) once per ablation with the real product
(``bas.extract``), generates with ``bas.generate`` over several seeds and reads each image back
with :func:`bas.mini.metrics.read_image`:

* identity: ``a photo of <assetK>`` shows an object of concept K's colour, with K's shape and
  texture (all three must match);
* composition: ``a photo of <asset0> and <asset1> ...`` (every handle) shows each concept
  (colour and shape); the fraction of the concepts shown;
* prompt adherence: ``a photo of <assetK> on a {colour} background`` has that background;
* leakage: in ``a photo of <assetK>``, the fraction of the scene's other concepts whose colour
  appears as an object (lower is better).

Each image is scored by the ``bas-mini`` evaluator (``bas/plugins/bas_mini.py``), the same code
that ``bas eval`` runs on bas-mini runs; this benchmark averages its per-image scores per prompt
group and seed.  Results go to ``benchmarks/results/fidelity-<date>.json`` with a grid per ablation beside it in
``benchmarks/results/fidelity-<date>/``, and the table is printed as markdown.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from PIL import Image

from bas.core.evaluation import EvalRun, Sample
from bas.mini import world
from bas.plugins.bas_mini import BasMini

RESULTS = Path(__file__).resolve().parent / "results"
ADHERENCE_BACKGROUNDS = ("yellow", "green")
METRICS = ("identity", "composition", "adherence", "leakage")
# identity taken apart (in the JSON, not the table): the concept's colour anywhere; the largest object's shape, texture
IDENTITY_PARTS = ("identity colour", "identity shape", "identity texture")


@dataclass
class Ablation:
    name: str
    what: str
    plugins: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)


ABLATIONS = [
    Ablation("full", "the full method: phase 1 + LoRA phase 2, masked loss, attention loss, union sampling"),
    Ablation("no-masked-loss", "diffusion loss over the whole image (--no-mask-loss)", options={"mask_loss": False}),
    Ablation("no-attention-loss", "without the cross-attention loss", plugins=["no:attention-loss"]),
    Ablation("no-union-sampling", "every step shows all concepts", plugins=["no:union-sampling"]),
    Ablation("phase1-only", "textual inversion: handles only", options={"phase2_steps": 0}),
    Ablation("phase2-only", "weights + handles from the start", options={"phase1_steps": 0}),
    Ablation("full-finetune", "phase 2 fine-tunes all UNet and text-encoder weights (lr 2e-6, the paper's)", plugins=["full"]),
]

SCENES = world.NOVEL_SCENES


def make_scene(directory: Path, name: str, seed: int = 0) -> tuple[Path, world.Scene]:
    import random

    background, objects = SCENES[name]
    scene = world.random_scene(random.Random(seed), objects=objects, background=background)
    scene.objects.sort(key=lambda o: o.box[0])  # handles in reading order, left to right
    return world.write_scene(directory / name, scene), scene


def prompts_for(n: int, background: str) -> dict[str, list[tuple[str, dict]]]:
    """Prompt groups with what each prompt asks for."""
    handles = [f"<asset{k}>" for k in range(n)]
    backgrounds = [b for b in ADHERENCE_BACKGROUNDS if b != background]
    return {
        "identity": [(f"a photo of {h}", {"concept": k}) for k, h in enumerate(handles)],
        "composition": [("a photo of " + " and ".join(handles), {"concepts": list(range(n))})],
        "adherence": [(f"a photo of {h} on a {b} background", {"concept": k, "background": b}) for k, h in enumerate(handles) for b in backgrounds],
    }


# each benchmark metric: the prompt group it is averaged over and the bas-mini evaluator's score it averages
METRIC_SOURCES = {
    "identity": ("identity", "identity"), "composition": ("composition", "composition"), "adherence": ("adherence", "adherence"),
    "leakage": ("identity", "leakage"), "identity colour": ("identity", "identity_colour"),
    "identity shape": ("identity", "identity_shape"), "identity texture": ("identity", "identity_texture"),
}


def evaluator_scores(run: EvalRun, groups: dict, images: dict[str, list[Path]]) -> dict[str, list[dict]]:
    """The bas-mini evaluator's scores of each prompt's images (a list per prompt, in seed order)."""
    concepts = {p: tuple(spec["concepts"]) if "concepts" in spec else (spec["concept"],) for items in groups.values() for p, spec in items}
    samples = [Sample(run.name, p, concepts[p], s, None, path) for p, paths in images.items() for s, path in enumerate(paths)]
    scored = iter(BasMini().score(run, samples))
    return {p: [next(scored) for _ in paths] for p, paths in images.items()}


def score_columns(groups: dict, scores: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Per-seed values of each metric: the mean over the prompts of its group of the evaluator's image scores."""
    n_seeds = len(next(iter(scores.values())))
    per_seed: dict[str, list[float]] = {m: [] for m in METRICS + IDENTITY_PARTS}
    for s in range(n_seeds):
        for name, (group, key) in METRIC_SOURCES.items():
            per_seed[name].append(float(np.mean([scores[p][s][key] for p, _ in groups[group]])))
    return per_seed


def run_ablation(ablation: Ablation, scene_dir: Path, scene: world.Scene, work: Path, *, model: str, steps: tuple[int, int],
                 seeds: list[int], sample_steps: int, guidance: float, attention_res: int | None, extraction_seed: int = 0,
                 learning_rates: dict | None = None) -> dict:
    from bas import extract, generate
    from bas.core.plugins import available_plugin_names

    n = len(scene.objects)
    options = dict(model=model, phase1_steps=steps[0], phase2_steps=steps[1], init_tokens=[o.shape for o in scene.objects],
                   overwrite=True, device="cpu", seed=extraction_seed, quiet=True)
    if attention_res and "no:attention-loss" not in ablation.plugins:
        options["attention_res"] = attention_res
    lrs = dict(learning_rates or {})
    full_lr = lrs.pop("full_phase2_lr", None)
    if "full" in ablation.plugins:
        lrs.pop("phase2_lr", None)
        if full_lr:
            lrs["phase2_lr"] = full_lr
    options.update({k: v for k, v in lrs.items() if v})
    options.update(ablation.options)
    plugins = list(ablation.plugins)
    # observers that only write files for people (report plots, resumable checkpoints) cost time, not fidelity
    available = set(available_plugin_names())
    plugins += ["no:report"] if "report" in available else []
    plugins += ["no:checkpoints"] if "checkpoints" in available else []
    out = work / f"{scene_dir.name}-{ablation.name}"
    masks = sorted(scene_dir.glob("mask*.png"))
    t0 = time.perf_counter()
    extract(scene_dir / "img.png", masks, out, plugins=plugins, **options)
    t_extract = time.perf_counter() - t0
    groups = prompts_for(n, scene.background)
    prompts = [p for group in groups.values() for p, _ in group]
    paths = generate(out, prompts, seeds=seeds, steps=sample_steps, guidance=guidance, grid=False, device="cpu", out_dir=out / "samples")
    images = [Image.open(p).convert("RGB") for p in paths]
    by_prompt = {p: paths[i * len(seeds):(i + 1) * len(seeds)] for i, p in enumerate(prompts)}
    per_seed = score_columns(groups, evaluator_scores(EvalRun(out.name, out, json.loads((out / "run.json").read_text())), groups, by_prompt))
    return {
        "per_seed": per_seed, "mean": {m: float(np.mean(v)) for m, v in per_seed.items()},
        "extract_s": round(t_extract, 1), "prompts": prompts, "images": images,
    }


def scene_tiles(scene_dir: Path) -> list[Image.Image]:
    tiles = [Image.open(scene_dir / "img.png").convert("RGB")]
    tiles += [Image.open(m).convert("RGB") for m in sorted(scene_dir.glob("mask*.png"))]
    return tiles


def ablation_grid(rows: list[tuple[list[Image.Image], list[Image.Image]]], seeds: int, tile: int = 64) -> Image.Image:
    """Per scene: a row with the input and masks, then one row per prompt (a column per seed)."""
    from bas.core.generation import image_grid

    lines: list[list[Image.Image]] = []
    for inputs, images in rows:
        lines.append(inputs)
        lines += [images[i : i + seeds] for i in range(0, len(images), seeds)]
    return image_grid([[t.resize((tile, tile)) for t in line] for line in lines])


def summarise(per_scene: dict[str, dict]) -> dict:
    """A value per seed, averaged over scenes; the mean and spread over seeds (identity's parts too)."""
    summary = {}
    for m in METRICS + IDENTITY_PARTS:
        values = np.mean([r["per_seed"][m] for r in per_scene.values()], axis=0)
        summary[m] = {"mean": float(values.mean()), "std": float(values.std()), "per_seed": [float(v) for v in values]}
    summary["extract_s"] = float(np.mean([r["extract_s"] for r in per_scene.values()]))
    return summary


def markdown_table(summary: dict[str, dict[str, dict]]) -> str:
    lines = ["| ablation | identity ↑ | composition ↑ | adherence ↑ | leakage ↓ | identity's colour / shape / texture ↑ | extract s |",
             "|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        cells = [f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}" for m in METRICS]
        cells.append(" / ".join(f"{row[m]['mean']:.2f}" for m in IDENTITY_PARTS))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['extract_s']:.0f} |")
    return "\n".join(lines)


def run_benchmark(out: Path, *, model: str = "bas-mini", scenes: list[str] | None = None, ablations: list[str] | None = None,
                  steps: tuple[int, int] = (200, 200), seeds: list[int] | None = None, sample_steps: int = 25,
                  guidance: float = 7.5, attention_res: int | None = 4, work: Path | None = None, grids: Path | None = None, learning_rates: dict | None = None, log=print) -> dict:
    """Every ablation on every scene; writes ``out`` (JSON) and a grid PNG per ablation in ``out``'s stem folder."""
    import tempfile

    scenes = scenes or list(SCENES)
    chosen = [a for a in ABLATIONS if ablations is None or a.name in ablations]
    seeds = seeds or [0, 1, 2, 3]
    out = Path(out)
    grids = Path(grids) if grids else out.with_suffix("")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        prepared = {name: make_scene(work / "scenes", name) for name in scenes}
        result = {
            "date": datetime.date.today().isoformat(), "model": model, "scenes": {n: {"background": s.background, "objects": [o.words() for o in s.objects]} for n, (_, s) in prepared.items()},
            "steps": list(steps), "seeds": seeds, "sample_steps": sample_steps, "guidance": guidance, "attention_res": attention_res,
            "init_tokens": "each concept's shape word", "learning_rates": learning_rates or "bas run's defaults", "ablations": {}, "summary": {},
        }
        for ablation in chosen:
            rows, per_scene = [], {}
            for name, (scene_dir, scene) in prepared.items():
                r = run_ablation(ablation, scene_dir, scene, work / "runs", model=model, steps=steps, seeds=seeds,
                                 sample_steps=sample_steps, guidance=guidance, attention_res=attention_res, learning_rates=learning_rates)
                rows.append((scene_tiles(scene_dir), r.pop("images")))
                per_scene[name] = r
                log(f"{ablation.name} on {name}: " + ", ".join(f"{m} {r['mean'][m]:.2f}" for m in METRICS) + f" ({r['extract_s']:.0f}s)")
            grid_path = grids / f"{ablation.name}.png"
            from bas.core import io

            io.save_image(grid_path, ablation_grid(rows, len(seeds)).quantize(colors=128))  # small files in the repo
            result["ablations"][ablation.name] = {"what": ablation.what, "plugins": ablation.plugins, "options": ablation.options,
                                                  "scenes": per_scene, "grid": grid_path.name}
            result["summary"][ablation.name] = summarise(per_scene)
    result["table"] = markdown_table(result["summary"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def merge_results(parts: list[Path], out: Path) -> dict:
    """One result from runs of different ablations with the same settings (e.g. run in parallel processes)."""
    results = [json.loads(Path(p).read_text()) for p in parts]
    merged = dict(results[0], ablations={}, summary={})
    for r in results:
        same = {k: r.get(k) for k in ("model", "scenes", "steps", "seeds", "sample_steps", "guidance", "attention_res", "learning_rates")}
        if same != {k: results[0].get(k) for k in same}:
            raise click.ClickException(f"cannot merge results with different settings: {same}")
        merged["ablations"].update(r["ablations"])
    order = [a.name for a in ABLATIONS]
    merged["summary"] = {k: summarise(merged["ablations"][k]["scenes"]) for k in sorted(merged["ablations"], key=order.index)}
    merged["table"] = markdown_table(merged["summary"])
    Path(out).write_text(json.dumps(merged, indent=1) + "\n")
    return merged


@click.command()
@click.option("--model", default="bas-mini", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: benchmarks/results/fidelity-<date>.json]")
@click.option("--scene", "scenes", multiple=True, type=click.Choice(list(SCENES)), help="Scenes to run [default: all].")
@click.option("--ablation", "ablations", multiple=True, type=click.Choice([a.name for a in ABLATIONS]), help="Ablations to run [default: all].")
@click.option("--phase1-steps", default=200, show_default=True)
@click.option("--phase2-steps", default=200, show_default=True)
@click.option("--seeds", default=4, show_default=True, help="Generation seeds per prompt.")
@click.option("--sample-steps", default=25, show_default=True, help="DDIM steps per image.")
@click.option("--guidance", default=7.5, show_default=True)
@click.option("--attention-res", default=4, show_default=True, help="Attention-loss map size (bas-mini's latent is 8x8; 4 is its middle level).")
@click.option("--threads", default=1, show_default=True, help="CPU threads for torch (1 is fastest on a busy shared CPU).")
@click.option("--phase1-lr", type=float, default=None, help="[default: bas run's, 5e-4]")
@click.option("--phase2-lr", type=float, default=None, help="Phase-2 learning rate of LoRA [default: bas run's, 1e-4].")
@click.option("--full-phase2-lr", type=float, default=None, help="Phase-2 learning rate of the full fine-tune [default: bas run's, 2e-6].")
@click.option("--phase2-handle-lr", type=float, default=None, help="Phase-2 learning rate of the handles [default: bas run's, 2e-6].")
@click.option("--grids", type=click.Path(path_type=Path), default=None, help="Folder of the grid PNGs [default: --out without .json].")
@click.option("--merge", "merge", multiple=True, type=click.Path(exists=True, path_type=Path), help="Instead of running: merge these result files into --out.")
def main(model, out, scenes, ablations, phase1_steps, phase2_steps, seeds, sample_steps, guidance, attention_res, threads, grids, merge, phase1_lr, phase2_lr, full_phase2_lr,
         phase2_handle_lr):
    """Run the fidelity benchmark and print its table."""
    import torch

    if merge:
        result = merge_results(list(merge), out or RESULTS / f"fidelity-{datetime.date.today().isoformat()}.json")
        click.echo(result["table"])
        return

    torch.set_num_threads(threads)
    out = out or RESULTS / f"fidelity-{datetime.date.today().isoformat()}.json"
    result = run_benchmark(out, model=model, scenes=list(scenes) or None, ablations=list(ablations) or None,
                           steps=(phase1_steps, phase2_steps), seeds=list(range(seeds)), sample_steps=sample_steps,
                           guidance=guidance, attention_res=attention_res, grids=grids,
                           learning_rates={k: v for k, v in (("phase1_lr", phase1_lr), ("phase2_lr", phase2_lr), ("full_phase2_lr", full_phase2_lr),
                                                                ("phase2_handle_lr", phase2_handle_lr)) if v} or None, log=lambda m: print(m, file=sys.stderr, flush=True))
    click.echo(result["table"])
    click.echo(f"Wrote {out}")


if __name__ == "__main__":
    main()
