"""Fidelity of extraction on bas-mini: the paper's ablations and more, with paired bootstrap intervals.

``python -m benchmarks.fidelity --jobs 2`` draws the scenes of :data:`SCENES` (two to four
objects each in colours or textures no bas-mini caption names; some touching, some with box
masks that take in background), extracts every scene once per ablation and extraction seed
through ``bas batch``'s Python API (``--jobs`` worker processes), then scores every run with
``bas eval``'s Python API and the ``bas-mini`` evaluator, which reads each generated image back
from its pixels (``bas/plugins/bas_mini.py``).  Per run, the prompts are:

* ``a photo of <assetK>`` for each concept: *identity* (an object of K's colour with K's shape and
  texture; its parts in the JSON) and *leakage* (the share of the other concepts whose colour
  shows, lower is better);
* ``a photo of <asset0> and <asset1> ...``: *composition*, the share of the concepts shown;
* ``a photo of <assetK> on a {colour} background`` for two colours other than the input's:
  *adherence* (that background) and *entanglement* (the share of the image's pixels in the input's
  background colour, lower is better: a concept that learned its surroundings brings them along).

Every ablation runs on the same scenes, extraction seeds and generation seeds, so its difference
from its baseline (``full``, or ``full-finetune`` for the full fine-tune's variants) is paired:
one difference per scene, extraction seed and generation seed, each the mean over the prompts of
its group.  Its 95% interval is the hierarchical bootstrap (:func:`bas.core.stats.nested_summary`):
resample scenes, then extraction seeds within each drawn scene, then generation seeds within each
drawn extraction.  The table marks a difference whose interval excludes 0 (``*``) and one that
also survives the Holm-Bonferroni correction over every difference in the table (``**``).

A measured sweep is ``--variant NAME:KEY=VALUE,...`` (repeatable): one more ablation of ``bas
run`` options (``plugins=a+b`` for plugins), compared with ``full`` or with the ablation or other
variant that ``vs=`` names, on the same scenes and seeds, in the same ``--work`` as the runs it is
paired with; ``--extraction-seeds 1`` makes a cheaper sweep that pairs with the first seed.

Results go to ``benchmarks/results/fidelity-<date>.json`` with a grid per ablation beside it in
``benchmarks/results/fidelity-<date>/``; runs and images stay in ``--work`` (a temporary folder
unless given), so a benchmark that was stopped continues where it was with the same ``--work``.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bas.mini import world

RESULTS = Path(__file__).resolve().parent / "results"
BACKGROUND_CHOICES = ("yellow", "green", "blue")  # the first two that differ from the input's are asked for
METRICS = ("identity", "composition", "adherence", "leakage", "entanglement", "prior")
IDENTITY_PARTS = ("identity_colour", "identity_shape", "identity_texture")
LOWER_IS_BETTER = {"leakage", "entanglement"}
# each benchmark metric: the prompt group it is averaged over (the evaluator scores more images than that, e.g. identity
# on "<asset0> on a yellow background" too; the benchmark keeps each metric to the prompts made for it)
METRIC_GROUP = {"identity": "identity", "leakage": "identity", "composition": "composition", "adherence": "background",
                "entanglement": "background", "prior": "prior", **{m: "identity" for m in IDENTITY_PARTS}}
# captions without handles that bas-mini draws (its base quality): does extraction keep what the model could do?
PRIOR_PROMPTS = ("a photo of a red circle on a blue background", "a photo of a green striped square on a grey background",
                 "a photo of a yellow triangle and a blue square on a black background", "a photo of a blue striped triangle on a yellow background")
PRIOR_CLASS_PROMPT = ""  # bas-mini's generic scene: its captions were dropped 10% of the time in training
PRIOR_CLASS_IMAGES = 100  # the reference code's count


# -- scenes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchScene:
    """A scene of the benchmark: background, objects ``(colour, shape, texture, box)`` and the kind of masks.

    ``masks="loose"``: each object's exact mask grown by 2 px and blurred (a careful hand-made mask);
    ``"box"``: the object's bounding box grown by 2 px (a rough rectangle, which takes in background,
    so a concept can learn its surroundings).
    """

    background: str
    objects: tuple[tuple[str, str, str, tuple[int, int, int, int]], ...]
    masks: str = "loose"
    note: str = ""

    def scene(self) -> world.Scene:
        return world.Scene(self.background, [world.Shape(c, s, t, box) for c, s, t, box in self.objects])


SCENES: dict[str, BenchScene] = {
    "purple-orange": BenchScene("grey", (("purple", "circle", "dotted", (6, 18, 32, 44)), ("orange", "square", "plain", (38, 20, 60, 42)))),
    "pink-cyan-orange": BenchScene("black", (("pink", "triangle", "plain", (4, 6, 28, 30)), ("cyan", "square", "striped", (36, 6, 58, 28)),
                                             ("orange", "circle", "dotted", (18, 36, 42, 60)))),
    "cyan-pink-touching": BenchScene("green", (("cyan", "circle", "plain", (6, 16, 32, 42)), ("pink", "square", "striped", (32, 18, 56, 42))),
                                     note="touching: the masks overlap"),
    "orange-purple-touching": BenchScene("blue", (("orange", "triangle", "dotted", (12, 6, 38, 32)), ("purple", "square", "plain", (14, 32, 40, 58))),
                                         masks="box", note="touching, box masks that overlap"),
    "four-colours": BenchScene("grey", (("orange", "circle", "plain", (4, 4, 28, 28)), ("purple", "triangle", "striped", (36, 4, 60, 28)),
                                        ("pink", "square", "plain", (4, 36, 28, 60)), ("cyan", "circle", "dotted", (36, 36, 60, 60)))),
    "red-dotted-cyan": BenchScene("yellow", (("red", "square", "dotted", (6, 20, 30, 44)), ("cyan", "triangle", "plain", (36, 18, 60, 42))),
                                  masks="box", note="box masks"),
    "row-touching": BenchScene("black", (("purple", "circle", "plain", (2, 22, 22, 42)), ("cyan", "square", "plain", (22, 22, 42, 42)),
                                         ("pink", "triangle", "dotted", (42, 22, 62, 42))), note="three in a row, touching"),
    "blue-dotted-orange-pink": BenchScene("grey", (("blue", "circle", "dotted", (4, 6, 28, 30)), ("orange", "triangle", "striped", (36, 4, 60, 28)),
                                                   ("pink", "square", "plain", (22, 38, 44, 60))), masks="box", note="box masks"),
}


def box_mask(box, grow: int = 2, size: int = world.SIZE) -> Image.Image:
    x0, y0, x1, y1 = box
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((x0 - grow, y0 - grow, x1 + grow - 1, y1 + grow - 1), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(0.7))


def write_scene(directory: Path, bench: BenchScene) -> Path:
    """``img.png``, ``mask0.png``, ... (handles in the order of :attr:`BenchScene.objects`) and ``scene.json``."""
    from bas.core import io

    directory = Path(directory)
    scene = bench.scene()
    image, masks = world.render(scene)
    io.save_image(directory / "img.png", image)
    for i, (mask, obj) in enumerate(zip(masks, scene.objects)):
        io.save_image(directory / f"mask{i}.png", world.loose_mask(mask) if bench.masks == "loose" else box_mask(obj.box))
    info = {"background": scene.background, "masks": bench.masks, "note": bench.note,
            "objects": [{"colour": o.colour, "shape": o.shape, "texture": o.texture, "box": list(o.box)} for o in scene.objects]}
    io.write_json(directory / "scene.json", info)
    return directory


def asked_backgrounds(background: str) -> list[str]:
    return [b for b in BACKGROUND_CHOICES if b != background][:2]


def prompt_groups(n: int, background: str) -> dict[str, list[str]]:
    """The prompts of a scene of ``n`` concepts, by group (see the module's docstring)."""
    handles = [f"<asset{k}>" for k in range(n)]
    return {
        "identity": [f"a photo of {h}" for h in handles],
        "composition": ["a photo of " + " and ".join(handles)],
        "background": [f"a photo of {h} on a {b} background" for h in handles for b in asked_backgrounds(background)],
        "prior": list(PRIOR_PROMPTS),
    }


# -- ablations ------------------------------------------------------------------------------------
@dataclass
class Ablation:
    name: str
    what: str
    plugins: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    baseline: str | None = "full"  # what its differences are taken against (None: the baseline itself)
    prior: bool = False  # needs the shared class images


ABLATIONS = [
    Ablation("full", "the full method: phase 1 + LoRA phase 2, masked loss, attention loss, union sampling", baseline=None),
    Ablation("no-masked-loss", "diffusion loss over the whole image (--no-mask-loss)", options={"mask_loss": False}),
    Ablation("no-attention-loss", "without the cross-attention loss", plugins=["no:attention-loss"]),
    Ablation("no-union-sampling", "every step shows all concepts", plugins=["no:union-sampling"]),
    Ablation("phase1-only", "textual inversion: handles only (--phase2-steps 0)", options={"phase2_steps": 0}),
    Ablation("phase2-only", "weights + handles from the start (--phase1-steps 0)", options={"phase1_steps": 0}),
    Ablation("full-finetune", "phase 2 fine-tunes all UNet and text-encoder weights (--plugin full)", plugins=["full"]),
    Ablation("prior-preservation", "LoRA with prior preservation (--plugin prior-preservation)", plugins=["prior-preservation"], prior=True),
    Ablation("full-finetune-prior", "the full fine-tune with prior preservation", plugins=["full", "prior-preservation"],
             baseline="full-finetune", prior=True),
    Ablation("handle-lr-1e-4", "phase 2 trains the handles at the LoRA rate, 1e-4 (bas before --phase2-handle-lr)",
             options={"phase2_handle_lr": 1e-4}),
    Ablation("background-handle", "one more handle for everything outside the masks, trained jointly (--background)",
             options={"background": True}),
]
ABLATION_NAMES = [a.name for a in ABLATIONS]


VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,40}")


def find_ablation(name: str, variants: list[Ablation] = ()) -> Ablation:
    return next(a for a in (*ABLATIONS, *variants) if a.name == name)


def parse_variant(text: str) -> Ablation:
    """``NAME:KEY=VALUE,...``: an ablation of ``bas run`` options (VALUE as JSON where it parses), with
    ``plugins=a+b`` for its plugins and ``vs=ABLATION`` for what its differences are taken against
    (default ``full``).  A sweep is several variants: ``attn-w0.1:attention_loss_weight=0.1``, ..."""
    name, sep, spec = text.partition(":")
    if not sep or not VARIANT_NAME.fullmatch(name) or "--" in name:
        raise click.BadParameter(f"{text!r} is not NAME:KEY=VALUE,... with a NAME of lower-case letters, digits, '.', '_' and single '-' "
                                 f"(such as attn-w0.1:attention_loss_weight=0.1)")
    if name in ABLATION_NAMES:
        raise click.BadParameter(f"the variant name {name!r} is a built-in ablation's; choose another")
    options, plugins, baseline = {}, [], "full"
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} in the variant {name!r} is not KEY=VALUE")
        if key == "plugins":
            plugins = [p for p in value.split("+") if p]
        elif key == "vs":
            baseline = value
        else:
            options[key] = option_value(value)
    what = ", ".join([*(f"--plugin {p}" for p in plugins), *(f"{k}={json.dumps(v)}" for k, v in options.items())]) or "the same as its baseline"
    return Ablation(name, f"variant: {what}", plugins=plugins, options=options, baseline=baseline)


def parse_variants(ctx, param, values) -> list[Ablation]:
    """``--variant`` values: each names a distinct variant, compared with a built-in ablation or another variant."""
    variants = [parse_variant(v) for v in values]
    names = [v.name for v in variants]
    for v in variants:
        if names.count(v.name) > 1:
            raise click.BadParameter(f"two variants are named {v.name!r}; give each its own name")
        if v.baseline not in (*ABLATION_NAMES, *names) or v.baseline == v.name:
            raise click.BadParameter(f"the variant {v.name!r} is compared with {v.baseline!r}, which is neither an ablation nor another "
                                     f"variant; use vs= one of {', '.join(ABLATION_NAMES)} or a variant's name")
    return variants


def with_baselines(names: list[str] | None, variants: list[Ablation] = ()) -> list[Ablation]:
    """The chosen ablations (all built-in ones when neither names nor variants are given), the
    variants, and the baselines their differences need, in table order (variants last)."""
    wanted = set(names or ([] if variants else ABLATION_NAMES)) | {v.name for v in variants}
    for name in list(wanted):
        baseline = find_ablation(name, variants).baseline
        while baseline:
            wanted.add(baseline)
            baseline = find_ablation(baseline, variants).baseline
    return [a for a in (*ABLATIONS, *variants) if a.name in wanted]


def run_name(scene: str, ablation: str, extraction_seed: int) -> str:
    return f"{scene}--{ablation}--e{extraction_seed}"


# -- extraction (bas batch) -----------------------------------------------------------------------
def observer_off() -> list[str]:
    """Observers that only write files for people (report plots, resumable checkpoints) cost time, not fidelity."""
    from bas.core.plugins import available_plugin_names

    available = set(available_plugin_names())
    return [f"no:{name}" for name in ("report", "checkpoints") if name in available]


def batch_lines(scenes: dict[str, Path], ablations: list[Ablation], extraction_seeds: list[int], class_dir: Path,
                learning_rates: dict, options: dict) -> list[dict]:
    """One ``bas batch`` manifest line per scene, ablation and extraction seed."""
    lines = []
    for ablation in ablations:
        for name, folder in scenes.items():
            info = json.loads((folder / "scene.json").read_text())
            masks = sorted(folder.glob("mask*.png"), key=lambda p: int(p.stem[4:]))
            for seed in extraction_seeds:
                line = {"name": run_name(name, ablation.name, seed), "image": str(folder / "img.png"), "masks": [str(m) for m in masks],
                        "init_tokens": [o["shape"] for o in info["objects"]], "seed": seed, "plugins": list(ablation.plugins)}
                line.update(strategy_rates(ablation, learning_rates))
                line.update(options)
                line.update(ablation.options)
                if ablation.prior:
                    line.update(class_data_dir=str(class_dir), class_prompt=PRIOR_CLASS_PROMPT, num_class_images=PRIOR_CLASS_IMAGES)
                lines.append(line)
    return lines


def strategy_rates(ablation: Ablation, learning_rates: dict) -> dict:
    """The learning rates for this ablation's weight strategy: ``full_phase2_lr`` is phase 2's rate of the full fine-tune."""
    rates = {k: v for k, v in learning_rates.items() if v is not None}
    full_lr = rates.pop("full_phase2_lr", None)
    if "full" in ablation.plugins:
        rates.pop("phase2_lr", None)
        if full_lr is not None:
            rates["phase2_lr"] = full_lr
    return rates


def prepare_class_images(class_dir: Path, scene: Path, common: dict, log) -> None:
    """Generate the prior-preservation class images once, with the plugin's own code, before the runs share them."""
    from bas import extract

    if len(list(class_dir.glob("*.png"))) >= PRIOR_CLASS_IMAGES:
        return
    log(f"generating {PRIOR_CLASS_IMAGES} class images for prior preservation into {class_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        masks = sorted(scene.glob("mask*.png"))
        extract(scene / "img.png", masks, Path(tmp) / "run", plugins=["prior-preservation", *observer_off()], model=common["model"],
                phase1_steps=0, phase2_steps=1, device="cpu", quiet=True, class_data_dir=str(class_dir), class_prompt=PRIOR_CLASS_PROMPT,
                num_class_images=PRIOR_CLASS_IMAGES)


def run_extractions(lines: list[dict], runs: Path, common: dict, jobs: int, quiet: bool) -> dict:
    """Every run through ``bas batch`` (finished runs with the same options are skipped, so a stopped benchmark resumes)."""
    import bas

    summary = bas.batch(lines, runs, executor="local", workers=jobs, quiet=quiet, **common)
    bad = [s for s in summary["scenes"] if s["status"] not in ("done", "skipped")]
    if bad:
        raise click.ClickException(f"{len(bad)} of {len(lines)} extractions did not finish; the first, {bad[0]['name']}: {bad[0]['status']}: "
                                   f"{bad[0].get('error')} (see {runs / 'batch.json'}).")
    return summary


# -- evaluation (bas eval) ------------------------------------------------------------------------
def eval_settings(seeds: list[int], sample_steps: int, guidance: float) -> dict:
    return {"num_images": len(seeds), "seed": seeds[0], "steps": sample_steps, "guidance": guidance}


def evaluate_run(task: tuple[str, str, str, dict]) -> str:
    """``bas eval`` of one run with the prompts of its scene (in a worker process; skipped when done with these settings)."""
    import torch

    import bas

    torch.set_num_threads(1)
    run, prompts, out, settings = task
    out_path = Path(out)
    done = out_path / "eval.json"
    if done.is_file():
        old = json.loads(done.read_text())["settings"]
        asked = {line.strip() for line in Path(prompts).read_text().splitlines() if line.strip()}
        if {k: old.get(k) for k in settings} == settings and {img["prompt"] for img in json.loads(done.read_text())["images"]} == asked:
            return out
    bas.evaluate([run], out, evaluators=["bas-mini"], prompts=prompts, device="cpu", quiet=True, overwrite=True, **settings)
    return out


def run_evaluations(names: list[str], runs: Path, evals: Path, prompt_files: dict[str, Path], settings: dict, jobs: int, log) -> None:
    tasks = [(str(runs / n), str(prompt_files[n.split("--")[0]]), str(evals / n), settings) for n in names]
    if jobs <= 1:
        for i, t in enumerate(tasks, 1):
            evaluate_run(t)
            log(f"evaluated {i}/{len(tasks)}: {Path(t[0]).name}")
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, out in enumerate(pool.map(evaluate_run, tasks), 1):
            log(f"evaluated {i}/{len(tasks)}: {Path(out).name}")


def read_values(eval_json: Path, groups: dict[str, list[str]], seeds: list[int]) -> dict[str, list[float]]:
    """Per metric, one value per generation seed: the mean over its group's prompts of the evaluator's image scores."""
    data = json.loads(eval_json.read_text())
    by = {(img["prompt"], img["seed"]): img["scores"] for img in data["images"]}
    values = {}
    for metric in METRICS + IDENTITY_PARTS:
        prompts = groups[METRIC_GROUP[metric]]
        values[metric] = [float(np.mean([by[(p, s)][metric] for p in prompts])) for s in seeds]
    return values


# -- statistics -----------------------------------------------------------------------------------
def collect(evals: Path, scene_groups: dict[str, dict], ablations: list[Ablation], extraction_seeds: list[int], seeds: list[int]) -> dict:
    """``{ablation: {metric: array (scenes, extraction seeds, generation seeds)}}``, scenes in the order given."""
    values: dict[str, dict[str, np.ndarray]] = {}
    for ablation in ablations:
        per_metric = {m: np.zeros((len(scene_groups), len(extraction_seeds), len(seeds))) for m in METRICS + IDENTITY_PARTS}
        for i, (scene, groups) in enumerate(scene_groups.items()):
            for j, e in enumerate(extraction_seeds):
                read = read_values(evals / run_name(scene, ablation.name, e) / "eval.json", groups, seeds)
                for m, v in read.items():
                    per_metric[m][i, j] = v
        values[ablation.name] = per_metric
    return values


def statistics(values: dict[str, dict[str, np.ndarray]], ablations: list[Ablation], resamples: int = 10_000) -> dict:
    """Per ablation and metric: the mean with its interval, and the paired difference from the baseline with its
    interval, p-value and significance (95% interval excluding 0; Holm-Bonferroni over the whole table)."""
    from bas.core.stats import holm, nested_summary

    result: dict[str, dict] = {}
    for a in ablations:
        row: dict[str, dict] = {}
        for m, x in values[a.name].items():
            entry = {"value": nested_summary(x, resamples=resamples)}
            if a.baseline:
                d = nested_summary(x - values[a.baseline][m], resamples=resamples)
                d["significant"] = bool(d["low"] > 0 or d["high"] < 0)
                entry["difference"] = d
            row[m] = entry
        result[a.name] = row
    tested = [(a, m) for a in result for m in METRICS if "difference" in result[a][m]]
    for (a, m), survives in zip(tested, holm([result[a][m]["difference"]["p"] for a, m in tested])):
        result[a][m]["difference"]["holm"] = bool(survives)
    return result


def cell(value: dict, difference: dict | None) -> str:
    text = f"{value['mean']:.2f}"
    if difference is None:
        return f"{text} [{value['low']:.2f}, {value['high']:.2f}]"
    mark = "**" if difference.get("holm") else "*" if difference["significant"] else ""
    return f"{text} ({difference['mean']:+.2f} [{difference['low']:+.2f}, {difference['high']:+.2f}]{mark})"


def markdown_table(stats: dict, ablations: list[Ablation]) -> str:
    """A row per ablation: each metric's mean, and (for all but a baseline) its paired difference with the 95% interval."""
    arrows = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in METRICS}
    lines = ["| ablation | vs | " + " | ".join(f"{m} {arrows[m]}" for m in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for a in ablations:
        row = stats[a.name]
        lines.append(f"| {a.name} | {a.baseline or ''} | " + " | ".join(cell(row[m]["value"], row[m].get("difference")) for m in METRICS) + " |")
    return "\n".join(lines)


# -- pictures -------------------------------------------------------------------------------------
def ablation_grid(evals: Path, scenes: dict[str, Path], scene_groups: dict[str, dict], ablation: str, extraction_seed: int,
                  seeds: list[int], tile: int = 64) -> Image.Image:
    """Per scene: a row with the input and masks, then a row per prompt (a column per generation seed)."""
    from bas.core.generation import image_grid, image_stem

    lines: list[list[Image.Image]] = []
    for name, folder in scenes.items():
        inputs = [Image.open(folder / "img.png").convert("RGB")]
        inputs += [Image.open(m).convert("RGB") for m in sorted(folder.glob("mask*.png"), key=lambda p: int(p.stem[4:]))]
        lines.append(inputs)
        images = evals / run_name(name, ablation, extraction_seed) / "images" / run_name(name, ablation, extraction_seed)
        for prompt in [p for group in scene_groups[name].values() for p in group]:
            lines.append([Image.open(images / f"{image_stem(prompt)}-seed{s}.png").convert("RGB") for s in seeds])
    return image_grid([[t.resize((tile, tile)) for t in line] for line in lines])


# -- the benchmark --------------------------------------------------------------------------------
def git_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_benchmark(out: Path, *, model: str = "bas-mini", scenes: list[str] | None = None, ablations: list[str] | None = None,
                  variants: list[Ablation] = (),
                  steps: tuple[int, int] = (200, 200), extraction_seeds: list[int] | None = None, seeds: list[int] | None = None,
                  sample_steps: int = 25, guidance: float = 7.5, attention_res: int | None = None, learning_rates: dict | None = None,
                  options: dict | None = None, jobs: int = 1, work: Path | None = None, grids: Path | None = None,
                  resamples: int = 10_000, quiet: bool = True, log=print) -> dict:
    """Every chosen ablation on every scene and extraction seed; writes ``out`` (JSON) and a grid PNG per ablation."""
    t_start = time.perf_counter()
    scene_names = scenes or list(SCENES)
    chosen = with_baselines(ablations, variants)
    extraction_seeds = extraction_seeds if extraction_seeds is not None else [0, 1, 2]
    seeds = seeds if seeds is not None else [0, 1, 2, 3]
    out = Path(out)
    grids = Path(grids) if grids else out.with_suffix("")
    learning_rates = dict(learning_rates or {})
    common = {"model": model, "phase1_steps": steps[0], "phase2_steps": steps[1], "device": "cpu", "quiet": True}
    if attention_res:
        common["attention_res"] = attention_res
    extra = dict(options or {})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp).resolve()
        scene_dirs = {name: write_scene(work / "scenes" / name, SCENES[name]) for name in scene_names}
        scene_groups = {name: prompt_groups(len(SCENES[name].objects), SCENES[name].background) for name in scene_names}
        prompt_files = {}
        for name, groups in scene_groups.items():
            prompt_files[name] = work / "prompts" / f"{name}.txt"
            prompt_files[name].parent.mkdir(parents=True, exist_ok=True)
            prompt_files[name].write_text("".join(p + "\n" for group in groups.values() for p in group))
        class_dir = work / "class_images"
        times = {}
        if any(a.prior for a in chosen):
            t = time.perf_counter()
            prepare_class_images(class_dir, scene_dirs[scene_names[0]], common, log)
            times["class_images_s"] = round(time.perf_counter() - t, 1)
        lines = batch_lines(scene_dirs, chosen, extraction_seeds, class_dir, learning_rates, extra)
        log(f"{len(lines)} extractions ({len(chosen)} ablations x {len(scene_names)} scenes x {len(extraction_seeds)} seeds), {jobs} at a time")
        t = time.perf_counter()
        summary = run_extractions(lines, work / "runs", {k: v for k, v in common.items() if k != "quiet"}, jobs, quiet)
        times["extraction_s"] = round(time.perf_counter() - t, 1)
        log(f"extractions done in {times['extraction_s'] / 60:.1f} min; evaluating {len(lines)} runs")
        t = time.perf_counter()
        names = [line["name"] for line in lines]
        run_evaluations(names, work / "runs", work / "eval", prompt_files, eval_settings(seeds, sample_steps, guidance), jobs, log)
        times["evaluation_s"] = round(time.perf_counter() - t, 1)
        values = collect(work / "eval", scene_groups, chosen, extraction_seeds, seeds)
        stats = statistics(values, chosen, resamples=resamples)
        from bas.core import io

        for a in chosen:
            grid = ablation_grid(work / "eval", scene_dirs, scene_groups, a.name, extraction_seeds[0], seeds)
            io.save_image(grids / f"{a.name}.png", grid.quantize(colors=64))  # small files in the repo
        run_seconds = {}
        for n in names:
            info = json.loads((work / "runs" / n / "run.json").read_text())
            run_seconds[n] = round(float(info.get("times", {}).get("total_s", 0.0)), 1)
    times["total_s"] = round(time.perf_counter() - t_start, 1)
    result = {
        "date": datetime.date.today().isoformat(), "git": git_revision(), "model": model, "jobs": jobs,
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "scenes": {n: {"background": SCENES[n].background, "masks": SCENES[n].masks, "note": SCENES[n].note,
                       "objects": [f"{c} {t} {s}" for c, s, t, _ in SCENES[n].objects], "prompts": scene_groups[n]} for n in scene_names},
        "steps": list(steps), "extraction_seeds": extraction_seeds, "seeds": seeds, "sample_steps": sample_steps, "guidance": guidance,
        "attention_res": attention_res or "bas run's default", "learning_rates": learning_rates or "bas run's defaults", "options": extra,
        "init_tokens": "each concept's shape word", "prior_preservation": {"class_prompt": PRIOR_CLASS_PROMPT, "class_images": PRIOR_CLASS_IMAGES},
        "interval": "95% hierarchical bootstrap (10,000 resamples): scenes, then extraction seeds within each scene, then generation seeds "
                    "within each extraction; differences are paired by scene, extraction seed and generation seed",
        "ablations": {a.name: {"what": a.what, "plugins": a.plugins, "options": a.options, "baseline": a.baseline,
                               "values": {m: v.tolist() for m, v in values[a.name].items()}} for a in chosen},
        "stats": stats, "times": times, "run_seconds": run_seconds,
        "batch": {"executor": summary.get("executor"), "workers": jobs},
        "table": markdown_table(stats, chosen),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    from bas.core import io

    io.write_json(out, result)
    return result


def parse_option(ctx, param, values):
    """``KEY=VALUE`` pairs (VALUE as JSON where it parses, else text) applied to every run."""
    parsed = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (such as attention_loss_weight=0.05)")
        parsed[key.replace("-", "_")] = option_value(value)
    return parsed


def option_value(text: str):
    """A bas run option's value from the command line: JSON where it parses (numbers, true, lists), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@click.command()
@click.option("--model", default="bas-mini", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: benchmarks/results/fidelity-<date>.json]")
@click.option("--scene", "scenes", multiple=True, type=click.Choice(list(SCENES)), help="Scenes to run [default: all].")
@click.option("--ablation", "ablations", multiple=True, type=click.Choice(ABLATION_NAMES), help="Ablations to run (their baselines are added) [default: all].")
@click.option("--variant", "variants", multiple=True, callback=parse_variants,
              help="NAME:KEY=VALUE,...: one more ablation of bas run options against `full` (plugins=a+b; vs=ABLATION or vs=VARIANT to change that), "
                   "on the same scenes and seeds; several make a sweep (repeatable). Only the variants (and their baselines) run "
                   "unless --ablation is also given.")
@click.option("--phase1-steps", default=200, show_default=True)
@click.option("--phase2-steps", default=200, show_default=True)
@click.option("--extraction-seeds", default=3, show_default=True, help="Extraction seeds per scene and ablation (0..N-1).")
@click.option("--seeds", default=4, show_default=True, help="Generation seeds per prompt (0..N-1).")
@click.option("--sample-steps", default=25, show_default=True, help="DDIM steps per image.")
@click.option("--guidance", default=7.5, show_default=True)
@click.option("--attention-res", type=int, default=None, help="Attention-loss map side [default: bas run's, a quarter of the latent side].")
@click.option("--phase1-lr", type=float, default=None, help="[default: bas run's, 5e-4]")
@click.option("--phase2-lr", type=float, default=None, help="Phase-2 learning rate of LoRA [default: bas run's, 1e-4].")
@click.option("--full-phase2-lr", type=float, default=None, help="Phase-2 learning rate of the full fine-tune [default: bas run's, 2e-6].")
@click.option("--phase2-handle-lr", type=float, default=None, help="Phase-2 learning rate of the handles [default: bas run's, 2e-6].")
@click.option("--set", "options", multiple=True, callback=parse_option, help="KEY=VALUE: a bas run option for every run (repeatable).")
@click.option("--jobs", default=1, show_default=True, help="Extractions (and evaluations) at a time, each a process with one torch thread.")
@click.option("--work", type=click.Path(path_type=Path), default=None, help="Folder for scenes, runs and images; the same --work resumes [default: a temporary one].")
@click.option("--grids", type=click.Path(path_type=Path), default=None, help="Folder of the grid PNGs [default: --out without .json].")
@click.option("--quiet", is_flag=True, help="No batch progress.")
def main(model, out, scenes, ablations, variants, phase1_steps, phase2_steps, extraction_seeds, seeds, sample_steps, guidance, attention_res,
         phase1_lr, phase2_lr, full_phase2_lr, phase2_handle_lr, options, jobs, work, grids, quiet):
    """Run the fidelity benchmark and print its table."""
    import torch

    torch.set_num_threads(1)
    out = out or RESULTS / f"fidelity-{datetime.date.today().isoformat()}.json"
    rates = {"phase1_lr": phase1_lr, "phase2_lr": phase2_lr, "full_phase2_lr": full_phase2_lr, "phase2_handle_lr": phase2_handle_lr}
    result = run_benchmark(out, model=model, scenes=list(scenes) or None, ablations=list(ablations) or None, variants=list(variants),
                           steps=(phase1_steps, phase2_steps), extraction_seeds=list(range(extraction_seeds)), seeds=list(range(seeds)),
                           sample_steps=sample_steps, guidance=guidance, attention_res=attention_res, options=options,
                           learning_rates={k: v for k, v in rates.items() if v is not None}, jobs=jobs, work=work, grids=grids, quiet=quiet,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    click.echo(result["table"])
    click.echo(f"Took {result['times']['total_s'] / 60:.1f} min. Wrote {out}")


if __name__ == "__main__":
    main()
