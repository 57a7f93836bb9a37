"""Fidelity of extraction on bas-mini: the paper's ablations and more, with paired intervals and a scene-level test.

``python -m benchmarks.fidelity --jobs 2`` takes a scene set (``--scenes``): ``tuning``, 12 scenes drawn
from a fixed seed and recorded in ``benchmarks/scenes/tuning.json``, where the operating point is chosen;
``test``, drawn from a seed that ``--choose-operating-point`` draws when it records the operating point
(``benchmarks/operating-point.json``), and run only at that point's settings; ``v2``, bas-mini v2's 8
hand-made scenes (:data:`SCENES`).  A drawn set has two to four objects per scene, a third of its scenes
touching, a third with box masks (that take in background), the rest with loose masks; every concept has
something no caption names (an unnamed colour, the cross or diamond shape, the dotted texture, a core of
a second colour), and every second scene two neighbours that can entangle (similar colours such as orange
beside red, or the same shape side by side).  It extracts every scene once per ablation and extraction
seed through ``bas batch``'s Python API (``--jobs`` worker processes), then scores every run with ``bas
eval``'s Python API and the ``bas-mini`` evaluator, which reads each generated image back from its
pixels (``bas/plugins/bas_mini.py``).  Per run, the prompts are:

* ``a photo of <assetK>`` for each concept: *identity* (an object of K's colour with K's shape, texture and
  core; its parts in the JSON), *leakage* (the share of the other concepts whose colour shows, lower is
  better), *swap* (K's colour nowhere but another concept's drawn: K drawn in its neighbour's colour, lower
  is better) and *count* (exactly one object drawn);
* ``a photo of <asset0> and <asset1> ...``: *composition*, the share of the concepts shown;
* ``a photo of <assetK> on a {colour} background`` for two colours other than the input's:
  *adherence* (that background) and *entanglement* (the share of the image's pixels in the input's
  background colour, lower is better: a concept that learned its surroundings brings them along).

Every ablation runs on the same scenes, extraction seeds and generation seeds, so its difference
from its baseline (``full``, or ``full-finetune`` for the full fine-tune's variants) is paired:
one difference per scene, extraction seed and generation seed, each the mean over the prompts of
its group.  Its 95% interval is the hierarchical bootstrap (:func:`bas.evaluation.stats.nested_summary`):
resample scenes, then extraction seeds within each drawn scene, then generation seeds within each
drawn extraction; ``*`` marks one that excludes 0.  With 8-12 scenes that interval is too narrow, so
each difference also has a scene-level test (:func:`bas.evaluation.stats.scene_test`: Wilcoxon's signed-rank
test over its scene means, and a t-interval).  A claim **holds** only where its Holm-corrected bootstrap
interval excludes 0 and the scene-level test agrees (the same side, Holm-corrected p < 0.05), Holm over
the table and every sweep that belongs to it (:func:`correct_family`); a ``*`` alone is *suggestive*.

A measured sweep is ``--variant NAME:KEY=VALUE,...`` (repeatable): one more ablation of ``bas
run`` options (``plugins=a+b`` for plugins), compared with ``full`` or with the ablation or other
variant that ``vs=`` names, on the same scenes and seeds, in the same ``--work`` as the runs it is
paired with; ``--extraction-seeds 1`` makes a cheaper sweep that pairs with the first seed.  A sweep
names its table with ``--belongs-to TABLE.json``: the table and all its sweeps are then corrected as one
family and rewritten (``--holm-over TABLE.json SWEEP.json ...`` does that again from the files alone).

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
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bas.mini import world
from benchmarks.commandline import Command, json_kind

RESULTS = Path(__file__).resolve().parent / "results"
BACKGROUND_CHOICES = ("yellow", "green", "blue")  # the first two that differ from the input's are asked for
METRICS = ("identity", "composition", "adherence", "leakage", "swap", "count", "entanglement", "prior")
IDENTITY_PARTS = ("identity_colour", "identity_shape", "identity_texture", "identity_core")
LOWER_IS_BETTER = {"leakage", "swap", "entanglement"}
# each benchmark metric: the prompt group it is averaged over (the evaluator scores more images than that, e.g. identity
# on "<asset0> on a yellow background" too; the benchmark keeps each metric to the prompts made for it)
METRIC_GROUP = {"identity": "identity", "leakage": "identity", "swap": "identity", "count": "identity", "composition": "composition",
                "adherence": "background", "entanglement": "background", "prior": "prior", **{m: "identity" for m in IDENTITY_PARTS}}
ALPHA = 0.05  # the family-wise error rate of the claims a table makes
GRID_COLOURS = 64  # grid PNGs (kept parts and the final grids) are quantized to this many colours: small files in the repo
# captions without handles that bas-mini draws (its base quality): does extraction keep what the model could do?
PRIOR_PROMPTS = ("a photo of a red circle on a blue background", "a photo of a green striped square on a grey background",
                 "a photo of a yellow triangle and a blue square on a black background", "a photo of a blue striped triangle on a yellow background")
PRIOR_CLASS_PROMPT = ""  # bas-mini's generic scene: its captions were dropped 10% of the time in training
PRIOR_CLASS_IMAGES = 100  # the reference code's count


# -- scenes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchScene:
    """A scene of the benchmark: background, objects ``(colour, shape, texture, box[, inner])`` and the kind of masks.

    ``masks="loose"``: each object's exact mask grown by 2 px and blurred (a careful hand-made mask);
    ``"box"``: the object's bounding box grown by 2 px (a rough rectangle, which takes in background,
    so a concept can learn its surroundings).  ``inner``: the colour of a two-colour object's core.
    """

    background: str
    objects: tuple[tuple, ...]
    masks: str = "loose"
    note: str = ""

    def scene(self) -> world.Scene:
        return world.Scene(self.background, [world.Shape(*o) for o in self.objects])

    def info(self) -> dict:
        """What a result file and ``scene.json`` record of it: enough to draw it again."""
        return {"background": self.background, "masks": self.masks, "note": self.note,
                "objects": [{"colour": o.colour, "shape": o.shape, "texture": o.texture, "box": list(o.box), "inner": o.inner}
                            for o in self.scene().objects]}

    @classmethod
    def from_info(cls, info: dict) -> "BenchScene":
        return cls(info["background"], tuple((o["colour"], o["shape"], o["texture"], tuple(o["box"]), o.get("inner")) for o in info["objects"]),
                   info.get("masks", "loose"), info.get("note", ""))


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


def scene_images(bench: BenchScene) -> tuple[Image.Image, list[Image.Image]]:
    """The scene's image and its masks, one per object in order (loose or box, as the scene says)."""
    scene = bench.scene()
    image, masks = world.render(scene)
    return image, [world.loose_mask(m) if bench.masks == "loose" else box_mask(o.box) for m, o in zip(masks, scene.objects)]


def write_scene(directory: Path, bench: BenchScene) -> Path:
    """``img.png``, ``mask0.png``, ... (handles in the order of :attr:`BenchScene.objects`) and ``scene.json``."""
    from bas.core import io

    directory = Path(directory)
    image, masks = scene_images(bench)
    io.save_image(directory / "img.png", image)
    for i, mask in enumerate(masks):
        io.save_image(directory / f"mask{i}.png", mask)
    io.write_json(directory / "scene.json", bench.info())
    return directory


def init_word(shape: str) -> str:
    """The word a handle starts from: its object's shape word, or "thing" for a shape no caption names (as captions say)."""
    return shape if shape in world.SHAPES else "thing"


# -- drawn scene sets -----------------------------------------------------------------------------
# Two disjoint sets drawn by one procedure: `tuning`, on which the operating point (learning rates, steps, the
# attention loss's side and weight) is chosen, recorded in SCENE_FILES["tuning"]; and `test`, drawn from a seed that
# is itself drawn when the operating point is written (OPERATING_POINT), so no choice can have seen it.
SCENE_DIR = Path(__file__).resolve().parent / "scenes"
TUNING_SEED, TUNING_COUNT = 28_1207, 12
TEST_COUNT = 16  # the default (12 at least): with n scenes Wilcoxon's p is at least 2/2^n, and Holm asks 0.05/m of the
# strongest of m claims, so 12 scenes can show nothing in a family of more than about 100 (16: about 1,600)
SCENE_KINDS = ("touching", "box", "loose")  # a third each: touching objects (loose masks that overlap), box masks, loose masks
# what identity words cannot give, each featured in turn by a scene's first object (the others draw theirs at random)
FEATURES = ("colour", "cross", "diamond", "dotted", "inner")
# neighbours a concept can be confused with: colours close to each other (in every fourth scene, the first two objects;
# every fourth scene from the third has two objects of one shape)
SIMILAR_COLOURS = (("orange", "red"), ("orange", "yellow"), ("pink", "purple"), ("cyan", "blue"))
OPERATING_POINT = Path(__file__).resolve().parent / "operating-point.json"
TEST_PREFIX = re.compile(r"test[0-9]*")  # a test set's scene names: test-NN-..., test2-NN-... for a later operating point


def draw_object(rng, feature: str | None, colour: str, shape: str | None, taken: set[str]) -> tuple:
    """``(colour, shape, texture, inner)`` of one concept with at least one attribute no caption names
    (``feature`` if given, else its colour's or one drawn); ``taken``: colours no core may have."""
    named_colour = colour in world.COLOURS
    if feature is None and named_colour:
        feature = rng.choice(FEATURES[1:])
    if shape is None:
        shape = feature if feature in world.NOVEL_SHAPES else rng.choice(world.NOVEL_SHAPES) if rng.random() < 0.3 else rng.choice(world.SHAPES)
    texture = "dotted" if feature == "dotted" else rng.choice(("plain", "plain", "striped", "dotted"))
    if feature == "inner":
        texture = "plain"
    inner = None
    if texture == "plain" and (feature == "inner" or rng.random() < 0.3):
        spare = [c for c in world.COLOURS + world.NOVEL_COLOURS if c not in taken and c != colour]
        inner = rng.choice(spare) if spare else None
    if named_colour and shape in world.SHAPES and texture != "dotted" and inner is None:  # nothing unnamed left: make the shape one
        shape = rng.choice(world.NOVEL_SHAPES)
    return colour, shape, texture, inner


def draw_scene(rng, index: int) -> BenchScene:
    """The ``index``-th scene of a set: its kind (:data:`SCENE_KINDS`), two to four objects in turn, a featured
    unnamed attribute (:data:`FEATURES`), and in every second scene two neighbours that can entangle (similar
    colours, or the same shape side by side).  Drawn until the pixel reader reads it back exactly (every
    object's colour, shape, texture and core) and its masks pick out their own objects."""
    from bas.plugins.bas_mini import read_concepts

    kind = SCENE_KINDS[index % len(SCENE_KINDS)]
    count = (2, 3, 4)[(index // len(SCENE_KINDS)) % 3]
    feature = FEATURES[index % len(FEATURES)]
    similar = SIMILAR_COLOURS[(index // 4) % len(SIMILAR_COLOURS)] if index % 4 == 0 else None
    same_shape = index % 4 == 2
    for _ in range(500):
        colours = list(rng.sample(similar, 2)) if similar else []
        pool = [c for c in world.COLOURS + world.NOVEL_COLOURS if c not in colours]
        colours += rng.sample(pool, count - len(colours))
        if feature == "colour" and colours[0] in world.COLOURS:
            continue
        taken = set(colours)
        objects = []
        for i, colour in enumerate(colours):
            shape = objects[0][1] if same_shape and i == 1 else None
            obj = draw_object(rng, feature if i == 0 else None, colour, shape, taken)
            taken |= {obj[3]} - {None}
            objects.append(obj)
        backgrounds = [b for b in world.BACKGROUNDS if b not in taken]
        if not backgrounds:
            continue
        background = rng.choice(backgrounds)
        boxes = world.touching_boxes(rng, count) if kind == "touching" else world.place_boxes(rng, count)
        if boxes is None:
            continue
        traits = [kind] + ([f"{similar[0]} beside {similar[1]}"] if similar else []) + (["the same shape side by side"] if same_shape else [])
        bench = BenchScene(background, tuple((*o[:3], tuple(box), o[3]) for o, box in zip(objects, boxes)),
                           masks="box" if kind == "box" else "loose", note=", ".join(traits))
        if reads_back(bench, read_concepts):
            return bench
    raise RuntimeError(f"no readable scene {index} in 500 draws")


def reads_back(bench: BenchScene, read_concepts) -> bool:
    """Whether the pixel reader reads the scene exactly (each object's colour, shape, texture, core and box within a
    pixel) and each mask names its own object (what the evaluator needs)."""
    from bas.mini import metrics

    image, masks = scene_images(bench)
    reading = metrics.read_image(image)
    objects = bench.scene().objects
    if reading.background != bench.background or len(reading.objects) != len(objects):
        return False
    for o in objects:
        found = reading.find(colour=o.colour)
        if found is None or (found.shape, found.texture, found.inner) != (o.shape, o.texture, o.inner):
            return False
        if max(abs(a - b) for a, b in zip(found.box, o.box)) > 1:  # where it is, too: touching objects split right
            return False
    try:
        _, concepts = read_concepts(image, [np.asarray(m, dtype=np.float32) / 255 for m in masks])
    except Exception:  # a mask that covers no object: not a scene the evaluator can score
        return False
    return [(c.colour, c.shape, c.texture, c.inner) for c in concepts] == [(o.colour, o.shape, o.texture, o.inner) for o in objects]


def draw_scenes(seed: int, count: int, prefix: str, exclude: dict[str, BenchScene] | None = None) -> dict[str, BenchScene]:
    """``count`` scenes named ``PREFIX-NN-KIND`` drawn from ``seed`` (see :func:`draw_scene`); none equal to a scene of ``exclude``."""
    import random

    rng = random.Random(seed)
    seen = {(b.background, b.objects) for b in (exclude or {}).values()}
    scenes: dict[str, BenchScene] = {}
    while len(scenes) < count:
        bench = draw_scene(rng, len(scenes))
        if (bench.background, bench.objects) not in seen:
            scenes[f"{prefix}-{len(scenes):02d}-{SCENE_KINDS[len(scenes) % len(SCENE_KINDS)]}"] = bench
    return scenes


def recorded_scenes(path: Path) -> dict[str, BenchScene]:
    data = json.loads(Path(path).read_text())
    return {name: BenchScene.from_info(info) for name, info in data["scenes"].items()}


def record_scenes(path: Path, name: str, seed: int, scenes: dict[str, BenchScene]) -> None:
    from bas.core import io

    io.write_json(path, {"set": name, "seed": seed, "drawn_by": "benchmarks.fidelity.draw_scenes", "scenes": {n: b.info() for n, b in scenes.items()}})


def load_operating_point(path: Path = OPERATING_POINT) -> dict:
    """The operating point chosen on the tuning scenes (see :func:`choose_operating_point`), or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise click.ClickException(f"{path} does not exist: the test scenes are drawn only after the operating point is chosen on the tuning "
                                   f"scenes; write it with `python -m benchmarks.fidelity --choose-operating-point RESULT.json` and bas run's "
                                   f"options as chosen, then run --scenes test.")
    try:
        point = json.loads(path.read_text())
        int(point["test_seed"]), int(point["test_scenes"]), point["chosen"], point["settings"]
        if not TEST_PREFIX.fullmatch(point.get("test_prefix", "test")):  # it names the scenes' folders and kept files
            raise ValueError(f"test_prefix {point['test_prefix']!r} is not test or testN")
        for s in earlier_test_sets(point)["sets"]:
            int(s["test_scenes"]), int(s["test_seed"]), str(s["chosen"]), str(s["operating_point"])
        seen_scenes(point)
        problem = settings_problem(point["settings"])
        if problem:
            raise ValueError(problem)
    except ValueError as exc:  # a JSON error's position, or what is wrong, in words
        raise click.ClickException(f"{path} is not an operating point written by --choose-operating-point ({exc}); write it again.") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise click.ClickException(f"{path} is not an operating point written by --choose-operating-point ({exc!r}); write it again.") from None
    return point


def settings_problem(settings) -> str | None:
    """What is wrong with an operating point's ``settings`` (as :func:`choose_operating_point` records them: ``steps``
    [phase 1, phase 2], ``learning_rates`` by option name, ``attention_res``, ``options`` and ``plugins``), or None."""
    if not isinstance(settings, dict):
        return f"its settings are {json_kind(settings)}, not an object"
    missing = [k for k in ("steps", "learning_rates", "attention_res", "options") if k not in settings]
    if missing:
        return f"its settings have no {', '.join(missing)}"
    steps = settings["steps"]
    if not (isinstance(steps, list) and len(steps) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in steps)):
        return f"its settings' steps {steps!r} are not [phase-1 steps, phase-2 steps]"
    rates = settings["learning_rates"]
    known = ("phase1_lr", "phase2_lr", "full_phase2_lr", "phase2_handle_lr")
    if not (isinstance(rates, dict) and all(k in known and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in rates.items())):
        return f"its settings' learning_rates {rates!r} are not an object of {', '.join(known)} and numbers"
    res = settings["attention_res"]
    if res is not None and not (isinstance(res, int) and not isinstance(res, bool) and res >= 0):
        return f"its settings' attention_res {res!r} is neither null nor a whole number"
    if not isinstance(settings["options"], dict):
        return f"its settings' options {settings['options']!r} are not an object of bas run options"
    plugins = settings.get("plugins", [])
    if not (isinstance(plugins, list) and all(isinstance(p, str) for p in plugins)):
        return f"its settings' plugins {plugins!r} are not a list of plugin names"
    return None


def earlier_test_sets(point: dict) -> dict:
    """The earlier test sets an operating point's own is drawn apart from (``{"sets": [...], "scenes": [info, ...]}``)."""
    return point.get("apart_from") or {"sets": [], "scenes": []}


def seen_scenes(point: dict) -> dict[str, BenchScene]:
    """The scenes of those earlier test sets, which the point's test set may not repeat."""
    return {f"seen-{i}": BenchScene.from_info(info) for i, info in enumerate(earlier_test_sets(point)["scenes"])}


def scene_set(name: str, operating_point: Path = OPERATING_POINT, count: int | None = None) -> tuple[dict[str, BenchScene], dict]:
    """The scenes of a set and what the result file records of how they were drawn.  ``count``: for the test set, more
    scenes than the operating point recorded, drawn on from its seed (the first ones are the recorded ones: the draw
    is sequential), to narrow intervals that the recorded count leaves too wide.  An operating point chosen after
    another's test scenes were seen draws its own apart from them too (``apart_from``, see :func:`choose_operating_point`)."""
    if name == "v2":
        return SCENES, {"name": "v2", "drawn": "by hand (bas-mini v2's benchmark)"}
    tuning = recorded_scenes(SCENE_DIR / "tuning.json")
    if name == "tuning":
        return tuning, {"name": "tuning", "seed": TUNING_SEED, "recorded": "benchmarks/scenes/tuning.json"}
    if name == "test":
        point = load_operating_point(operating_point)
        recorded = int(point["test_scenes"])
        if count is not None and count < recorded:
            raise click.ClickException(f"--test-scenes {count} is fewer than the {recorded} the operating point drew; run a part of them "
                                       f"with --scene NAME, or more with a larger --test-scenes.")
        scenes = draw_scenes(int(point["test_seed"]), count or recorded, point.get("test_prefix", "test"), exclude={**tuning, **seen_scenes(point)})
        record = {"name": "test", "seed": int(point["test_seed"]), "drawn_after": f"the operating point chosen {point['chosen']}"}
        if earlier_test_sets(point)["sets"]:
            record["apart_from"] = [f"the {s['test_scenes']} test scenes of the operating point chosen {s['chosen']} ({s['operating_point']})"
                                    for s in earlier_test_sets(point)["sets"]]
        if len(scenes) > recorded:
            record["extended"] = f"{len(scenes)} scenes, the operating point's {recorded} and {len(scenes) - recorded} more drawn on from its seed"
        return scenes, record
    raise click.BadParameter(f"no scene set {name!r}; use one of {', '.join(SCENE_SETS)}")


SCENE_SETS = ("tuning", "test", "v2")


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
                learning_rates: dict, options: dict, plugins: list[str] = ()) -> list[dict]:
    """One ``bas batch`` manifest line per scene, ablation and extraction seed; ``plugins``: every run's (the operating
    point's), less those the ablation turns off (:func:`run_plugins`)."""
    lines = []
    objects = {name: json.loads((folder / "scene.json").read_text())["objects"] for name, folder in scenes.items()}
    masks = {name: [str(m) for m in sorted(folder.glob("mask*.png"), key=lambda p: int(p.stem[4:]))] for name, folder in scenes.items()}
    for ablation in ablations:
        own_plugins, own_options = run_plugins(ablation, plugins), options_without_plugins_off(ablation, options, plugins)  # once each
        for name, folder in scenes.items():
            for seed in extraction_seeds:
                line = {"name": run_name(name, ablation.name, seed), "image": str(folder / "img.png"), "masks": list(masks[name]),
                        "init_tokens": [init_word(o["shape"]) for o in objects[name]], "seed": seed, "plugins": list(own_plugins)}
                line.update(strategy_rates(ablation, learning_rates))
                line.update(own_options)
                line.update(ablation.options)
                if ablation.prior:
                    line.update(class_data_dir=str(class_dir), class_prompt=PRIOR_CLASS_PROMPT, num_class_images=PRIOR_CLASS_IMAGES)
                lines.append(line)
    return lines


def plugins_off(ablation: Ablation, plugins: list[str] = ()) -> set[str]:
    """The plugins ``ablation`` turns off: those it names ``no:X``, and of every run's ``plugins`` those its weight
    strategy cannot run (a loss term that needs adapters, ``LossTerm.needs_adapters``, under ``full-finetune``): the
    result says so through its runs' plugins."""
    off = {p[3:] for p in ablation.plugins if p.startswith("no:")}
    kept = [p for p in plugins if p not in off and p not in ablation.plugins]
    if kept:
        from bas.core.plugins import Plugins
        from bas.core.training import adapter_conflicts

        off |= set(adapter_conflicts(Plugins([*kept, *ablation.plugins]))) & set(kept)
    return off


def run_plugins(ablation: Ablation, plugins: list[str] = ()) -> list[str]:
    """An ablation's ``--plugin`` list: every run's ``plugins`` (the operating point's) less those it turns off, then its own."""
    off = plugins_off(ablation, plugins)
    return [p for p in plugins if p not in off and p not in ablation.plugins] + list(ablation.plugins)


def options_without_plugins_off(ablation: Ablation, options: dict, plugins: list[str] = ()) -> dict:
    """``options`` (every run's: the operating point's, ``--set``) less those of the plugins ``ablation`` turns off
    (``no:attention-loss`` runs without ``attention_loss_weight``: that plugin is what the ablation removes)."""
    off = plugins_off(ablation, plugins)
    if not off:
        return dict(options)
    from bas.core.plugins import Plugins

    owned = {opt.name for plugin, opt in Plugins(all_installed=True).run_options() if plugin in off}
    return {k: v for k, v in options.items() if k.replace("-", "_") not in owned}


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
                num_class_images=PRIOR_CLASS_IMAGES, model_defaults=False)


def run_extractions(lines: list[dict], runs: Path, common: dict, jobs: int, quiet: bool) -> dict:
    """Every run through ``bas batch`` (finished runs with the same options are skipped, so a stopped benchmark resumes)."""
    import bas

    # every setting is the benchmark's own (its lines and `common`), none of bas-mini's recommended ones (bas_model_settings):
    # a table's `full` is what it says it is, whatever bas run's defaults for bas-mini become
    summary = bas.batch(lines, runs, executor="local", workers=jobs, quiet=quiet, model_defaults=False, **common)
    bad = [s for s in summary["scenes"] if s["status"] not in ("done", "skipped")]
    if bad:
        raise click.ClickException(f"{len(bad)} of {len(lines)} extractions did not finish; the first, {bad[0]['name']}: {bad[0]['status']}: "
                                   f"{bad[0].get('error')} (see {runs / 'batch.json'}).")
    return summary


# -- evaluation (bas eval) ------------------------------------------------------------------------
def eval_settings(seeds: list[int], sample_steps: int, guidance: float, sample_batch: int = 1) -> dict:
    return {"num_images": len(seeds), "seed": seeds[0], "steps": sample_steps, "guidance": guidance, "batch_size": sample_batch}


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


def read_values(data: dict, groups: dict[str, list[str]], seeds: list[int]) -> dict[str, list[float]]:
    """Per metric, one value per generation seed: the mean over its group's prompts of the evaluator's image scores
    (``data``: an ``eval.json``'s content, or kept scores)."""
    by = {(img["prompt"], img["seed"]): img["scores"] for img in data["images"]}
    values = {}
    for metric in METRICS + IDENTITY_PARTS:
        prompts = groups[METRIC_GROUP[metric]]
        values[metric] = [float(np.mean([by[(p, s)][metric] for p in prompts])) for s in seeds]
    return values


# -- statistics -----------------------------------------------------------------------------------
def collect(scores: dict[str, dict], scene_groups: dict[str, dict], ablations: list[Ablation], extraction_seeds: list[int],
            seeds: list[int]) -> dict:
    """``{ablation: {metric: array (scenes, extraction seeds, generation seeds)}}``, scenes in the order given
    (``scores``: each run's ``eval.json`` content or kept scores, by run name)."""
    values: dict[str, dict[str, np.ndarray]] = {}
    for ablation in ablations:
        per_metric = {m: np.zeros((len(scene_groups), len(extraction_seeds), len(seeds))) for m in METRICS + IDENTITY_PARTS}
        for i, (scene, groups) in enumerate(scene_groups.items()):
            for j, e in enumerate(extraction_seeds):
                read = read_values(scores[run_name(scene, ablation.name, e)], groups, seeds)
                for m, v in read.items():
                    per_metric[m][i, j] = v
        values[ablation.name] = per_metric
    return values


def statistics(values: dict[str, dict[str, np.ndarray]], ablations: list[Ablation], resamples: int = 10_000, label: str = "this table") -> dict:
    """Per ablation and metric: the mean with its interval, and the paired difference from the baseline with its 95%
    interval, p-value, scene-level test and verdict, the table corrected as a family of its own (:func:`correct_family`
    corrects a table together with its sweeps)."""
    stats = differences(values, ablations, resamples)
    correct_family([(stats, values, {a.name: a.baseline for a in ablations})], [label], resamples)
    return stats


def differences(values: dict[str, dict[str, np.ndarray]], ablations: list[Ablation], resamples: int = 10_000) -> dict:
    """Per ablation and metric: ``{"value": ..., "difference": ...}``, each difference paired by scene, extraction seed
    and generation seed: its 95% hierarchical bootstrap (``significant``: the interval excludes 0, a ``*``) and the
    scene-level test of its scene means (``scene``: :func:`bas.evaluation.stats.scene_test`)."""
    from bas.evaluation.stats import nested_summary, scene_test

    result: dict[str, dict] = {}
    for a in ablations:
        row: dict[str, dict] = {}
        for m, x in values[a.name].items():
            entry = {"value": nested_summary(x, resamples=resamples)}
            if a.baseline:
                d = x - values[a.baseline][m]
                entry["difference"] = nested_summary(d, resamples=resamples)
                entry["difference"]["significant"] = bool(entry["difference"]["low"] > 0 or entry["difference"]["high"] < 0)
                entry["difference"]["scene"] = scene_test(d)
            row[m] = entry
        result[a.name] = row
    return result


def correct_family(tables: list[tuple[dict, dict, dict]], labels: list[str], resamples: int = 10_000) -> int:
    """Holm over every difference of the table's metrics in ``tables`` (a table and its sweeps: ``(stats, values,
    baselines)`` each), in place: per difference, ``holm`` (the family, the Holm-adjusted p-values of the bootstrap
    and of the scene-level test, and both intervals at Holm's confidence for its rank: the i-th smallest p of m at
    ``1 - ALPHA / (m - i + 1)``) and ``verdict``: ``holds`` where the corrected bootstrap interval excludes 0 (adjusted
    p < ALPHA) and the scene-level test agrees (the same side, adjusted p < ALPHA); ``suggestive`` where only the
    uncorrected 95% interval excludes 0 (a ``*``); ``""`` otherwise.  Returns the family's size."""
    from bas.evaluation.stats import holm_adjusted, holm_confidences, nested_summary, scene_test

    tested = []  # (difference entry, paired differences)
    for stats, values, baselines in tables:
        for a, row in stats.items():
            for m in METRICS:
                if m in row and "difference" in row[m]:
                    tested.append((row[m]["difference"], values[a][m] - values[baselines[a]][m]))
    boot_p, scene_p = [d["p"] for d, _ in tested], [d["scene"]["p"] for d, _ in tested]
    boot_adjusted, boot_confidence = holm_adjusted(boot_p), holm_confidences(boot_p, ALPHA)
    scene_adjusted, scene_confidence = holm_adjusted(scene_p), holm_confidences(scene_p, ALPHA)
    for i, (d, x) in enumerate(tested):
        boot = nested_summary(x, confidence=boot_confidence[i], resamples=resamples)
        scene = scene_test(x, confidence=scene_confidence[i])
        d["holm"] = {"family": len(tested), "files": list(labels), "p": boot_adjusted[i], "confidence": boot_confidence[i],
                     "low": boot["low"], "high": boot["high"], "scene_p": scene_adjusted[i], "scene_confidence": scene_confidence[i],
                     "scene_low": scene["low"], "scene_high": scene["high"]}
        d["verdict"] = verdict(d)
    return len(tested)


def verdict(difference: dict) -> str:
    """``holds``, ``suggestive`` or ``""`` for a difference that :func:`correct_family` corrected (see there)."""
    h = difference["holm"]
    side = 1 if h["low"] > 0 else -1 if h["high"] < 0 else 0
    bootstrap = side != 0 and h["p"] < ALPHA
    scene = h["scene_p"] < ALPHA and difference["scene"]["direction"] == side
    return "holds" if bootstrap and scene else "suggestive" if difference["significant"] else ""


def cell(value: dict, difference: dict | None) -> str:
    text = f"{value['mean']:.2f}"
    if difference is None:
        return f"{text} [{value['low']:.2f}, {value['high']:.2f}]"
    mark = "*" if difference["significant"] else ""
    said = difference.get("verdict", "")
    word = " **holds**" if said == "holds" else f" {said}" if said else ""
    return f"{text} ({difference['mean']:+.2f} [{difference['low']:+.2f}, {difference['high']:+.2f}]{mark}{word})"


def markdown_table(stats: dict, ablations: list[Ablation]) -> str:
    """A row per ablation: each metric's mean, and (for all but a baseline) its paired difference with the 95% interval
    (``*``: it excludes 0) and the verdict (``holds`` / ``suggestive``, see :func:`correct_family`)."""
    shown = [m for m in METRICS if all(m in stats[a.name] for a in ablations)]  # a file from before a metric existed has none of it
    arrows = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in shown}
    lines = ["| ablation | vs | " + " | ".join(f"{m} {arrows[m]}" for m in shown) + " |", "|---|---|" + "---|" * len(shown)]
    for a in ablations:
        row = stats[a.name]
        lines.append(f"| {a.name} | {a.baseline or ''} | " + " | ".join(cell(row[m]["value"], row[m].get("difference")) for m in shown) + " |")
    return "\n".join(lines)


# -- the paper's claims ----------------------------------------------------------------------------
MARGIN = 0.05  # issue 28: a claim that does not hold must be shown not to, by an interval narrower than this


@dataclass(frozen=True)
class Claim:
    """A claim of the paper as a difference of ``ablation`` from ``full`` in ``metric``: ``side`` +1 or -1 where the
    paper says which way it falls (without the part, the metric rises or falls), 0 where the claim is that the two
    are the same (within :data:`MARGIN`)."""

    name: str
    says: str
    ablation: str
    metric: str
    side: int


CLAIMS = [
    Claim("masked-loss-leakage", "the masked diffusion loss lowers leakage", "no-masked-loss", "leakage", +1),
    Claim("attention-loss-leakage", "the cross-attention loss lowers leakage", "no-attention-loss", "leakage", +1),
    Claim("union-sampling-composition", "union sampling raises composition", "no-union-sampling", "composition", -1),
    Claim("phases-vs-phase1-identity", "both phases draw concepts better than phase 1 alone (identity)", "phase1-only", "identity", -1),
    Claim("phases-vs-phase1-composition", "both phases compose better than phase 1 alone", "phase1-only", "composition", -1),
    Claim("phases-vs-phase2-identity", "both phases draw concepts better than phase 2 alone (identity)", "phase2-only", "identity", -1),
    Claim("phases-vs-phase2-composition", "both phases compose better than phase 2 alone", "phase2-only", "composition", -1),
    Claim("lora-vs-full-identity", "LoRA draws concepts as the full fine-tune does (identity within +-0.05)", "full-finetune", "identity", 0),
    Claim("lora-vs-full-prior", "LoRA keeps the base model's prior as the full fine-tune does (within +-0.05)", "full-finetune", "prior", 0),
]


def scenes_for_margin(boot_half: float, scene_half: float, n: int, confidence: float, limit: int = 100_000) -> int | None:
    """About how many scenes would bring both half-widths under :data:`MARGIN`, with the spread of these ``n``: the
    bootstrap's shrinks as one over the root of the scenes; the t-interval's also loses its small-sample quantile
    (the scene means' spread is read back from it at ``confidence``).  None with fewer than two scenes."""
    from scipy import stats as scipy_stats

    if n < 2 or not (np.isfinite(boot_half) and np.isfinite(scene_half)):
        return None
    quantile = lambda k: scipy_stats.t.ppf(1 - (1 - confidence) / 2, k - 1)  # noqa: E731
    spread = scene_half * np.sqrt(n) / quantile(n)  # the scene means' standard deviation
    for k in range(2, limit + 1):
        if boot_half * np.sqrt(n / k) < MARGIN and quantile(k) * spread / np.sqrt(k) < MARGIN:
            return k
    return None


def claim_verdict(claim: Claim, difference: dict) -> dict:
    """Whether ``claim`` holds, from its difference as :func:`correct_family` left it (both intervals Holm-corrected).

    A claim of a side **holds** where the difference holds (:func:`verdict`) on that side; it is **reversed** where
    it holds on the other; it **does not hold** where both corrected intervals exclude an effect of :data:`MARGIN`
    or more on the claimed side; else it is **unsettled** (the intervals are too wide to say).  A claim of no
    difference holds where both corrected intervals lie within +-MARGIN, does not hold where the difference holds,
    and is otherwise unsettled.  ``half_width``: the wider corrected interval's half-width; ``scenes_for_margin``: about how
    many scenes would bring it under :data:`MARGIN` (it shrinks as one over the root of the scenes), for the claims the
    table leaves unsettled."""
    h = difference["holm"]
    boot, scene = (h["low"], h["high"]), (h["scene_low"], h["scene_high"])
    if scene[0] is None:  # one scene: no t-interval
        scene = (-np.inf, np.inf)
    holds = difference.get("verdict") == "holds"
    if claim.side == 0:
        inside = all(-MARGIN < low and high < MARGIN for low, high in (boot, scene))
        state = "holds" if inside else "does not hold" if holds else "unsettled"
        reach = max(abs(boot[0]), abs(boot[1]), abs(scene[0]), abs(scene[1]))
    else:
        on_side = lambda interval: interval[1] if claim.side > 0 else -interval[0]  # noqa: E731  the largest effect the claimed way
        mean_side = np.sign(difference["mean"])
        reach = max(on_side(boot), on_side(scene))
        state = ("holds" if mean_side == claim.side else "reversed") if holds else "does not hold" if reach < MARGIN else "unsettled"
    half = max((boot[1] - boot[0]) / 2, (scene[1] - scene[0]) / 2)
    n = difference["scene"]["n"]
    needed = scenes_for_margin((boot[1] - boot[0]) / 2, (scene[1] - scene[0]) / 2, n, h["scene_confidence"])
    return {"claim": claim.name, "says": claim.says, "ablation": claim.ablation, "metric": claim.metric, "side": claim.side,
            "verdict": state, "mean": difference["mean"], "interval": list(boot), "scene_interval": list(scene),
            "largest_effect_not_excluded": float(reach), "half_width": float(half), "scenes": n,
            "scenes_for_margin": needed}


def claim_verdicts(stats: dict) -> list[dict]:
    """Every claim of :data:`CLAIMS` whose ablation is in ``stats`` (against ``full``), judged by :func:`claim_verdict`."""
    return [claim_verdict(c, stats[c.ablation][c.metric]["difference"]) for c in CLAIMS
            if c.ablation in stats and c.metric in stats[c.ablation] and "difference" in stats[c.ablation][c.metric]]


def claims_table(claims: list[dict]) -> str:
    """A row per claim: the difference (ablation minus full) with both Holm-corrected intervals, and the verdict."""
    lines = ["| the paper's claim | difference (without it, minus full) | Holm-corrected bootstrap | scene-level t | verdict | "
             "half-width (scenes for +-0.05) |", "|---|---|---|---|---|---|"]
    for c in claims:
        (bl, bh), (sl, sh) = c["interval"], c["scene_interval"]
        needed = f" ({c['scenes_for_margin']})" if c["half_width"] >= MARGIN and c.get("scenes_for_margin") else ""
        lines.append(f"| {c['says']} | {c['ablation']}, {c['metric']}: {c['mean']:+.3f} | [{bl:+.3f}, {bh:+.3f}] | [{sl:+.3f}, {sh:+.3f}] | "
                     f"**{c['verdict']}** | {c['half_width']:.3f}{needed} |")
    return "\n".join(lines)


# issue 28's targets for the full method on the test scenes: (metric, "at least" / "at most", bound)
TARGETS = [("identity", "at least", 0.6), ("composition", "at least", 0.5), ("leakage", "at most", 0.05)]
PRIOR_MARGIN = 0.03  # the full method's prior within this of the base model's (phase1-only's: it draws a caption as the base does)


def target_checks(stats: dict) -> list[dict]:
    """The full method against :data:`TARGETS` (its mean and 95% interval: ``met`` where the mean is on the target's
    side, ``surely`` where the whole interval is), and its prior against the base model's: phase 1 trains only the
    handles' rows, so ``phase1-only`` draws a caption without handles exactly as the base model does, and the
    difference of its prior from full's, Holm-corrected, must lie within +-:data:`PRIOR_MARGIN`."""
    if "full" not in stats:
        return []
    checks = []
    for metric, how, bound in TARGETS:
        v = stats["full"][metric]["value"]
        sign = 1 if how == "at least" else -1  # on the target's side: sign * (x - bound) >= 0
        checks.append({"target": f"{metric} {how} {bound}", "mean": v["mean"], "interval": [v["low"], v["high"]],
                       "met": bool(sign * (v["mean"] - bound) >= 0), "surely": bool(min(sign * (v["low"] - bound), sign * (v["high"] - bound)) >= 0)})
    if "phase1-only" in stats and "prior" in stats["phase1-only"]:
        d = stats["phase1-only"]["prior"]["difference"]
        h = d["holm"]
        low, high = -h["high"], -h["low"]  # full minus base
        inside = -PRIOR_MARGIN < low and high < PRIOR_MARGIN
        checks.append({"target": f"prior within {PRIOR_MARGIN} of the base model's", "mean": -d["mean"], "interval": [low, high],
                       "met": bool(abs(d["mean"]) < PRIOR_MARGIN), "surely": bool(inside)})
    return checks


def targets_table(checks: list[dict]) -> str:
    lines = ["| target (full method) | value [interval] | met |", "|---|---|---|"]
    for c in checks:
        said = "yes, whole interval" if c["surely"] else "the mean only" if c["met"] else "no"
        lines.append(f"| {c['target']} | {c['mean']:.3f} [{c['interval'][0]:.3f}, {c['interval'][1]:.3f}] | {said} |")
    return "\n".join(lines)


# -- a table and its sweeps, corrected together ---------------------------------------------------
def load_result(path: Path) -> dict:
    """A result file of the benchmark, checked to be one: every field that :func:`holm_over`, ``--belongs-to`` and
    ``--choose-operating-point`` read has the shape the benchmark writes (each ablation's values finite numbers of
    scenes x extraction seeds x generation seeds, as many as its baseline's, which is in the file), or one clear error."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path} is not a result of benchmarks/fidelity.py ({exc}); give the JSON files it wrote.") from None
    problem = result_problem(result)
    if problem:
        raise click.ClickException(f"{path} is not a result of benchmarks/fidelity.py ({problem}); give the JSON files it wrote, as it wrote them.")
    return result


def result_problem(result) -> str | None:
    """What is wrong with a result file's content (see :func:`load_result`), or None."""
    if not isinstance(result, dict):
        return f"it holds {json_kind(result)}, not an object"
    if not isinstance(result.get("stats"), dict):
        return "it has no stats object"
    ablations = result.get("ablations")
    if not isinstance(ablations, dict):
        return "its ablations are not an object of ablation records"
    shapes = {}
    for name, info in ablations.items():
        if not isinstance(info, dict):
            return f"ablation {name!r} is {json_kind(info)}, not a record"
        if not isinstance(info.get("values"), dict) or not info["values"]:
            return f"ablation {name!r} has no values"
        kinds = (("what", "", str), ("plugins", [], list), ("options", {}, dict))
        if not all(isinstance(info.get(key, default), kind) for key, default, kind in kinds):
            return f"ablation {name!r}'s what, plugins or options are not text, a list and an object"
        shapes[name] = {}
        for metric, values in info["values"].items():
            try:
                x = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                x = None
            if x is None or x.ndim != 3 or x.size == 0 or not np.isfinite(x).all():
                return f"ablation {name!r}'s {metric} values are not finite numbers of scenes x extraction seeds x generation seeds"
            shapes[name][metric] = x.shape
    for name, info in ablations.items():
        baseline = info.get("baseline")
        if baseline is None:
            continue
        if not isinstance(baseline, str) or baseline not in ablations:
            return f"ablation {name!r}'s baseline {baseline!r} is not in the file"
        if any(shapes[baseline].get(m) != shape for m, shape in shapes[name].items()):
            return f"ablation {name!r}'s values do not pair with its baseline {baseline!r}'s (other metrics or other counts)"
    if "targets" in result and any(m not in shapes.get("full", {}) for m, _, _ in TARGETS):
        return "it has targets but no values of full's " + ", ".join(m for m, _, _ in TARGETS)
    scene_set = result.get("scene_set")
    if scene_set is not None and not (isinstance(scene_set, dict) and isinstance(scene_set.get("name", "v2"), str)):
        return "its scene_set is not a record with a name"
    if "belongs_to" in result and result["belongs_to"] is not None and table_name(result) is None:
        return f"its belongs_to {result['belongs_to']!r} is not a file name"
    resamples = result.get("resamples", 10_000)
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        return f"its resamples {resamples!r} is not a positive whole number"
    return None


def scene_set_name_of(result: dict) -> str:
    """The name of the scene set a (checked) result ran on: v2 for a file from before the sets were named."""
    return (result.get("scene_set") or {}).get("name", "v2")


def ablations_record(ablations: list[Ablation], values: dict[str, dict[str, np.ndarray]]) -> dict:
    """What a result file keeps of each ablation: what it is, its baseline and every value, so its statistics recompute."""
    return {a.name: {"what": a.what, "plugins": a.plugins, "options": a.options, "baseline": a.baseline,
                     "values": {m: v.tolist() for m, v in values[a.name].items()}} for a in ablations}


def result_ablations(result: dict) -> list[Ablation]:
    return [Ablation(name, info.get("what", ""), list(info.get("plugins", [])), dict(info.get("options", {})), info.get("baseline"))
            for name, info in result["ablations"].items()]


def result_values(result: dict) -> dict[str, dict[str, np.ndarray]]:
    return {name: {m: np.asarray(v, dtype=np.float64) for m, v in info["values"].items()} for name, info in result["ablations"].items()}


def table_name(result: dict) -> str | None:
    """A result's ``belongs_to`` where it is one (a non-empty path without a NUL), else None."""
    name = result.get("belongs_to")
    return name if isinstance(name, str) and name and "\0" not in name else None


def belongs_to(path: Path, result: dict) -> Path | None:
    """The table a sweep file belongs to (its ``belongs_to``, relative to the sweep's folder), or None for a table."""
    name = table_name(result)
    return (Path(path).parent / name).resolve() if name else None


def holm_over(table: Path, sweeps: list[Path], log=print) -> int:
    """Recompute the statistics of a table and of every sweep that belongs to it from their values, correct them as one
    Holm family, and rewrite each file's ``stats``, ``holm_family`` and ``table``.  Every sweep must name ``table`` as the
    table it belongs to, and every file beside the given ones that names it must be given.  Returns the family's size."""
    from bas.core import io

    results = load_family(table, sweeps)
    table = next(iter(results))
    tables, labels = [], [p.name for p in results]
    for result in results.values():
        ablations = result_ablations(result)
        values = result_values(result)
        result["stats"] = differences(values, ablations, int(result.get("resamples", 10_000)))
        tables.append((result["stats"], values, {a.name: a.baseline for a in ablations}))
    size = correct_family(tables, labels, int(results[table].get("resamples", 10_000)))
    for path, result in results.items():
        result["holm_family"] = {"files": labels, "size": size}
        result["table"] = markdown_table(result["stats"], result_ablations(result))
        claims = claim_verdicts(result["stats"])
        result.pop("claims", None), result.pop("claims_table", None)
        if claims:
            result["claims"], result["claims_table"] = claims, claims_table(claims)
        if "targets" in result:
            result["targets"] = target_checks(result["stats"])
            result["targets_table"] = targets_table(result["targets"])
        io.write_json(path, result)
        log(f"{path.name}: {sum(d['verdict'] == 'holds' for d in iter_differences(result['stats']))} of the family's {size} claims hold here")
    return size


def load_family(table: Path, sweeps: list[Path], coming: Path | None = None) -> dict[Path, dict]:
    """The results of a table and of its sweeps (resolved paths, the table first), checked to be one whole family: every
    sweep names ``table`` as the table it belongs to, every file beside it that names it is given, all ran on one scene
    set; or one clear error.  ``coming``: a sweep about to be written (``--belongs-to``), that need not be there yet."""
    table = Path(table).resolve()
    sweeps = [Path(s).resolve() for s in sweeps]
    results = {table: load_result(table)}
    if table_name(results[table]):
        raise click.ClickException(f"{table} is a sweep of {results[table]['belongs_to']}, not a table; give that table first.")
    for sweep in sweeps:
        results[sweep] = load_result(sweep)
        owner = belongs_to(sweep, results[sweep])
        if owner != table:
            raise click.ClickException(f"{sweep} belongs to {owner or 'no table (it is a table itself)'}, not to {table}; give only the "
                                       f"sweeps of {table.name} (run a sweep with --belongs-to {table.name}).")
    missing = [p for p in sweeps_of(table) if p not in results and p != coming]
    if missing:
        raise click.ClickException(f"{missing[0]} is a sweep of {table.name} too; give every sweep of a table, so the family is whole.")
    scene_sets = {p: scene_set_name_of(r) for p, r in results.items()}
    if len(set(scene_sets.values())) > 1:
        raise click.ClickException(f"the files ran on different scene sets ({', '.join(f'{p.name}: {n}' for p, n in scene_sets.items())}); "
                                   f"a sweep belongs to a table of its own scenes.")
    return results


def iter_differences(stats: dict):
    for row in stats.values():
        for m in METRICS:
            if m in row and "difference" in row[m]:
                yield row[m]["difference"]


def sweeps_of(table: Path) -> list[Path]:
    """The files beside ``table`` that name it as the table they belong to."""
    table = Path(table).resolve()
    found = []
    for other in sorted(table.parent.glob("*.json")):
        try:
            data = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or table_name(data) is None:  # a table, or no sweep of anything: a file it cannot read
            continue
        try:
            owner = belongs_to(other, data)
        except (OSError, ValueError):
            continue
        if owner == table:
            found.append(other.resolve())
    return found


# -- pictures -------------------------------------------------------------------------------------
def scene_grid(evals: Path, folder: Path, groups: dict, scene: str, ablation: str, extraction_seed: int, seeds: list[int],
               tile: int = 64) -> Image.Image:
    """One scene's part of an ablation's grid: a row with the input and masks, then a row per prompt (a column per
    generation seed)."""
    from bas.generation.generate import image_grid, image_stem

    inputs = [Image.open(folder / "img.png").convert("RGB")]
    inputs += [Image.open(m).convert("RGB") for m in sorted(folder.glob("mask*.png"), key=lambda p: int(p.stem[4:]))]
    lines = [inputs]
    images = evals / run_name(scene, ablation, extraction_seed) / "images" / run_name(scene, ablation, extraction_seed)
    for prompt in [p for group in groups.values() for p in group]:
        lines.append([Image.open(images / f"{image_stem(prompt)}-seed{s}.png").convert("RGB") for s in seeds])
    return image_grid([[t.resize((tile, tile)) for t in line] for line in lines])


LABEL_WIDTH = 232  # the grids' label column, in pixels: about 38 characters of PIL's default font per line


def grid_labels(scene: str, groups: dict) -> list[str]:
    """A scene part's row labels: the scene and what its first row shows, then each row's prompt and its group."""
    return [f"{scene}: the input, then its masks"] + [f"{group}: {p}" for group, prompts in groups.items() for p in prompts]


def stack_grids(parts: list[Image.Image], labels: list[list[str]] | None = None, title: str | None = None) -> Image.Image:
    """The scenes' parts one under another, left-aligned on white (as one ``image_grid`` of all their rows); with
    ``labels`` (a part's row labels, :func:`grid_labels`), a column on the left names each row, and ``title`` heads
    the image, so a grid is read without the README."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    left = LABEL_WIDTH if labels else 0
    width = left + max(p.width for p in parts)
    heading = textwrap.wrap(title, max(20, (width - 8) // 6)) if title else []
    top = 12 * len(heading) + 4 if heading else 0
    grid = Image.new("RGB", (width, top + sum(p.height for p in parts)), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(heading):
        draw.text((4, 2 + 12 * i), line, fill="black", font=font)
    y = top
    for k, part in enumerate(parts):
        grid.paste(part, (left, y))
        if labels:
            rows = labels[k]
            height = part.height / len(rows)
            for r, text in enumerate(rows):
                lines = textwrap.wrap(text, 38)[: max(1, int(height // 12))]
                for i, line in enumerate(lines):
                    draw.text((4, y + r * height + 2 + 12 * i), line, fill="black", font=font)
            draw.line([(0, y), (left - 4, y)], fill=(160, 160, 160))  # where a scene starts (the images stay as drawn)
        y += part.height
    return grid


# -- kept scores (resuming on another machine) ----------------------------------------------------
def fingerprint(line: dict, common: dict, settings: dict) -> dict:
    """What a run's scores depend on: its batch line without the work folder's paths, the shared options and the
    evaluation's settings.  Kept scores are used again only where this is the same."""
    return {"line": {k: v for k, v in line.items() if k not in ("image", "masks", "class_data_dir")},
            "common": {k: v for k, v in common.items() if k != "quiet"}, "eval": settings}


def kept_path(keep: Path, name: str) -> Path:
    return keep / "scores" / f"{name}.json"


def kept_scores(keep: Path, line: dict, finger: dict) -> dict | None:
    """The kept scores of this run, if kept with the same fingerprint; a kept file made otherwise is an error (the
    two would mix in one table)."""
    path = kept_path(keep, line["name"])
    if not path.is_file():
        return None
    data = read_kept(path)
    if not isinstance(data.get("fingerprint"), dict) or not isinstance(data.get("run_seconds"), (int, float)):
        raise click.ClickException(f"{path} is not a kept score file (it has no fingerprint or run_seconds); remove it and the benchmark "
                                   f"makes it again.")
    if data["fingerprint"] != json.loads(json.dumps(finger)):
        raise click.ClickException(f"{path} was kept by a benchmark with other settings; give another --keep folder, or remove "
                                   f"{keep} to start again with these.")
    return data


def read_kept(path: Path) -> dict:
    """A kept score file's content (:func:`keep_scene`), its images checked (each a prompt, a seed and numeric scores),
    or one clear error: what reads them (the benchmark resuming, ``benchmarks.attributes``) stops before any work."""
    try:
        data = json.loads(Path(path).read_text())
        problem = kept_problem(data)
    except (OSError, ValueError) as exc:
        problem = str(exc)
    if problem:
        raise click.ClickException(f"{path} is not a kept score file ({problem}); remove it and the benchmark makes it again.")
    return data


def kept_problem(data) -> str | None:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return "it has no list of images"
    for image in data["images"]:
        if not (isinstance(image, dict) and isinstance(image.get("prompt"), str) and isinstance(image.get("seed"), int)
                and isinstance(image.get("scores"), dict)):
            return "an image is not a prompt, a seed and scores"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in image["scores"].values()):
            return f"the scores of {image['prompt']!r} are not all numbers"
    return None


def keep_scene(keep: Path, work: Path, scene: str, scene_lines: list[dict], fingers: dict[str, dict], folder: Path, groups: dict,
               ablations: list[str], extraction_seed: int, seeds: list[int]) -> None:
    """Keep a finished scene: each run's scores and time, and its grid part per ablation; then free its runs and images."""
    import shutil

    from bas.core import io

    for ablation in ablations:
        part = scene_grid(work / "eval", folder, groups, scene, ablation, extraction_seed, seeds).quantize(colors=GRID_COLOURS)
        io.save_image(keep / "grids" / f"{scene}--{ablation}.png", part)
    for line in scene_lines:
        name = line["name"]
        data = json.loads((work / "eval" / name / "eval.json").read_text())
        info = json.loads((work / "runs" / name / "run.json").read_text())
        kept = {"fingerprint": fingers[name], "settings": data["settings"],
                "images": [{"prompt": img["prompt"], "seed": img["seed"], "scores": img["scores"]} for img in data["images"]],
                "run_seconds": round(float(info.get("times", {}).get("total_s", 0.0)), 1)}
        io.write_text(kept_path(keep, name), json.dumps(kept, separators=(",", ":")) + "\n")  # one line: 432 of them go in the repo
    for line in scene_lines:  # only once every file above is written
        shutil.rmtree(work / "runs" / line["name"], ignore_errors=True)
        shutil.rmtree(work / "eval" / line["name"], ignore_errors=True)


# -- the benchmark --------------------------------------------------------------------------------
def git_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def check_outputs(out: Path, grids: Path, work: Path | None, keep: Path | None) -> None:
    """Refuse, before hours of runs, every path the benchmark would only fail to write at the end (or
    after its first scene): ``--out`` a folder or below a file, ``--grids``, ``--work`` or ``--keep`` a
    file or below one, ``--grids`` the same path as ``--out``."""
    from bas.core import io

    io.check_output_file(out, "--out")
    if grids.resolve() == out.resolve():
        raise click.ClickException(f"--out {out} is also the folder of its grids; pass a path ending in .json, or --grids elsewhere.")
    for option, folder in (("--grids", grids), ("--work", work), ("--keep", keep)):
        if folder is not None:
            io.check_output_folder(Path(folder), option)


def run_benchmark(out: Path, *, model: str = "bas-mini", scenes: list[str] | None = None, ablations: list[str] | None = None,
                  variants: list[Ablation] = (),
                  steps: tuple[int, int] = (200, 200), extraction_seeds: list[int] | None = None, seeds: list[int] | None = None,
                  sample_steps: int = 25, sample_batch: int = 16, guidance: float = 7.5, attention_res: int | None = None, learning_rates: dict | None = None,
                  options: dict | None = None, plugins: list[str] = (), jobs: int = 1, work: Path | None = None, grids: Path | None = None,
                  resamples: int = 10_000, quiet: bool = True, scene_set_name: str = "tuning", table: Path | None = None,
                  operating_point: Path = OPERATING_POINT, keep: Path | None = None, test_scenes: int | None = None, log=print) -> dict:
    """Every chosen ablation on every scene (of the set ``scene_set_name``, all or the ``scenes`` named) and extraction
    seed; writes ``out`` (JSON) and a grid PNG per ablation.  ``table``: the result file this run is a sweep of (its
    claims are then corrected together with the table's and every other sweep's, and all of them rewritten).
    The ``test`` set runs only at the operating point (``operating_point``'s settings).  Scenes run one at a time;
    ``keep``: a folder where each finished scene's scores and grid parts are kept (and its runs and images freed), so
    that the benchmark resumes from them alone, on another machine or in a fresh ``work``."""
    t_start = time.perf_counter()
    out = Path(out)
    grids = Path(grids) if grids else out.with_suffix("")
    check_outputs(out, grids, work, keep)
    keep = Path(keep).resolve() if keep else None
    learning_rates = dict(learning_rates or {})
    extra = dict(options or {})
    plugins = list(plugins)
    bench_scenes, scene_record = scene_set(scene_set_name, operating_point, test_scenes)
    point = None
    if scene_set_name == "test":
        point = load_operating_point(operating_point)
        given = {"steps": list(steps), "learning_rates": learning_rates, "attention_res": attention_res, "options": extra, "plugins": plugins}
        if given != {"plugins": [], **point["settings"]}:  # a point written before plugins were recorded had none
            raise click.ClickException(f"the test scenes run at the operating point chosen {point['chosen']} ({operating_point}): "
                                       f"{json.dumps(point['settings'])}, not {json.dumps(given)}; leave those options out.")
    unknown = [n for n in scenes or () if n not in bench_scenes]
    if unknown:
        raise click.ClickException(f"no scene {unknown[0]!r} in the {scene_set_name} set; its scenes: {', '.join(bench_scenes)}.")
    if table is not None:
        table = Path(table).resolve()
        if table == out.resolve():
            raise click.ClickException(f"--belongs-to names the file this run writes, {out}; name the table it is a sweep of.")
        if table_name(load_result(table)):
            raise click.ClickException(f"{table} is itself a sweep; a sweep belongs to the table it extends, the file without --belongs-to.")
        # the family this run joins is corrected again once it is written (holm_over): what would refuse it then is refused now
        family = load_family(table, [p for p in sweeps_of(table) if p != out.resolve()], coming=out.resolve())
        ran_on = scene_set_name_of(family[table])
        if ran_on != scene_set_name:
            raise click.ClickException(f"--belongs-to {table.name} ran on the {ran_on} scenes, this run on the {scene_set_name} scenes; a sweep "
                                       f"belongs to a table of its own scenes (give --scenes {ran_on}, or another table).")
    scene_names = list(scenes or bench_scenes)
    chosen = with_baselines(ablations, variants)
    extraction_seeds = extraction_seeds if extraction_seeds is not None else [0, 1, 2]
    seeds = seeds if seeds is not None else [0, 1, 2, 3]
    common = {"model": model, "phase1_steps": steps[0], "phase2_steps": steps[1], "device": "cpu", "quiet": True}
    if attention_res:
        common["attention_res"] = attention_res
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp).resolve()
        scene_dirs = {name: write_scene(work / "scenes" / name, bench_scenes[name]) for name in scene_names}
        scene_groups = {name: prompt_groups(len(bench_scenes[name].objects), bench_scenes[name].background) for name in scene_names}
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
        lines = batch_lines(scene_dirs, chosen, extraction_seeds, class_dir, learning_rates, extra, plugins)
        settings = eval_settings(seeds, sample_steps, guidance, sample_batch)
        fingers = {line["name"]: fingerprint(line, {**common, "model": model}, settings) for line in lines}
        log(f"{len(lines)} extractions ({len(chosen)} ablations x {len(scene_names)} scenes x {len(extraction_seeds)} seeds), {jobs} at a time, "
            "a scene at a time" + (f"; scores kept in {keep}" if keep else ""))
        times.update(extraction_s=0.0, evaluation_s=0.0)
        scores: dict[str, dict] = {}
        run_seconds: dict[str, float] = {}
        summary: dict = {}
        parts: dict[str, list[Image.Image]] = {a.name: [] for a in chosen}
        for k, name in enumerate(scene_names, 1):
            scene_lines = [line for line in lines if line["name"].split("--")[0] == name]
            kept = {line["name"]: kept_scores(keep, line, fingers[line["name"]]) for line in scene_lines} if keep else {}
            # with --keep, only the ablations not yet kept for this scene run (a later sweep reuses its baseline's kept runs)
            by_ablation = {a.name: [line for line in scene_lines if line["name"].split("--")[1] == a.name] for a in chosen}
            todo = [a for a, a_lines in by_ablation.items() if not keep or not (keep / "grids" / f"{name}--{a}.png").is_file()
                    or not all(kept[line["name"]] for line in a_lines)]
            todo_lines = [line for a in todo for line in by_ablation[a]]
            if not todo_lines:
                log(f"scene {k}/{len(scene_names)} {name}: kept in {keep}")
            else:
                t = time.perf_counter()
                summary = run_extractions(todo_lines, work / "runs", {k_: v for k_, v in common.items() if k_ != "quiet"}, jobs, quiet)
                times["extraction_s"] += time.perf_counter() - t
                t = time.perf_counter()
                run_evaluations([line["name"] for line in todo_lines], work / "runs", work / "eval", prompt_files, settings, jobs,
                                lambda m: None)
                times["evaluation_s"] += time.perf_counter() - t
                if keep:
                    keep_scene(keep, work, name, todo_lines, fingers, scene_dirs[name], scene_groups[name], todo, extraction_seeds[0], seeds)
                reused = f", {len(scene_lines) - len(todo_lines)} kept before" if len(todo_lines) < len(scene_lines) else ""
                log(f"scene {k}/{len(scene_names)} {name}: {len(todo_lines)} runs extracted and evaluated{reused} "
                    f"({(time.perf_counter() - t_start) / 60:.1f} min so far)")
            for line in scene_lines:
                n = line["name"]
                if keep:
                    scores[n] = kept.get(n) or kept_scores(keep, line, fingers[n])  # read once: already, or just kept
                    run_seconds[n] = scores[n]["run_seconds"]
                else:
                    scores[n] = json.loads((work / "eval" / n / "eval.json").read_text())
                    info = json.loads((work / "runs" / n / "run.json").read_text())
                    run_seconds[n] = round(float(info.get("times", {}).get("total_s", 0.0)), 1)
            for a in chosen:
                part = (Image.open(keep / "grids" / f"{name}--{a.name}.png") if keep else
                        scene_grid(work / "eval", scene_dirs[name], scene_groups[name], name, a.name, extraction_seeds[0], seeds).quantize(
                            colors=GRID_COLOURS))  # as kept: a palette per scene
                parts[a.name].append(part.convert("RGB"))
        times = {k: round(v, 1) for k, v in times.items()}
        values = collect(scores, scene_groups, chosen, extraction_seeds, seeds)
        stats = statistics(values, chosen, resamples=resamples, label=out.name)
        from bas.core import io

        labels = [grid_labels(name, scene_groups[name]) for name in scene_names]
        for a in chosen:
            title = (f"{a.name}: per scene its input and masks, then a row per prompt; a column per generation seed "
                     f"({', '.join(map(str, seeds))}); extraction seed {extraction_seeds[0]}")
            io.save_image(grids / f"{a.name}.png", stack_grids(parts[a.name], labels, title).quantize(colors=GRID_COLOURS))  # small files
    times["total_s"] = round(time.perf_counter() - t_start, 1)
    result = {
        "date": datetime.date.today().isoformat(), "git": git_revision(), "model": model, "jobs": jobs,
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "scene_set": scene_record, "operating_point": point,
        "scenes": {n: {**bench_scenes[n].info(), "described": [o.describe() for o in bench_scenes[n].scene().objects],
                       "prompts": scene_groups[n]} for n in scene_names},
        "steps": list(steps), "extraction_seeds": extraction_seeds, "seeds": seeds, "sample_steps": sample_steps,
        "sample_batch": sample_batch, "guidance": guidance,
        "attention_res": attention_res or "bas run's default", "learning_rates": learning_rates or "bas run's defaults", "options": extra,
        **({"plugins": plugins} if plugins else {}),
        "init_tokens": "each concept's shape word, or 'thing' for a shape no caption names",
        "prior_preservation": {"class_prompt": PRIOR_CLASS_PROMPT, "class_images": PRIOR_CLASS_IMAGES},
        "interval": f"95% hierarchical bootstrap ({resamples:,} resamples): scenes, then extraction seeds within each scene, then generation "
                    "seeds within each extraction; differences are paired by scene, extraction seed and generation seed",
        "rule": "a difference holds where its Holm-corrected hierarchical interval excludes 0 and the Wilcoxon signed-rank test over its "
                "scene means agrees (the same side, Holm-corrected p < 0.05), Holm over the table and every sweep that belongs to it; "
                "a * alone (the 95% interval excludes 0) is suggestive",
        "resamples": resamples, "holm_family": {"files": [out.name], "size": sum(1 for _ in iter_differences(stats))},
        "ablations": ablations_record(chosen, values),
        "stats": stats, "times": times, "run_seconds": run_seconds,
        "batch": {"executor": summary.get("executor", "local"), "workers": jobs},
        "table": markdown_table(stats, chosen),
    }
    claims = claim_verdicts(stats)
    if claims:
        result["claims"] = claims
        result["claims_table"] = claims_table(claims)
    if point is not None:  # the test scenes: issue 28's targets
        result["targets"] = target_checks(stats)
        result["targets_table"] = targets_table(result["targets"])
    if table is not None:
        result["belongs_to"] = os.path.relpath(table, out.resolve().parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    from bas.core import io

    io.write_json(out, result)
    if table is not None:  # the sweep joins its table's family: the table and every sweep of it are corrected again
        holm_over(table, sorted(set(sweeps_of(table)) | {out.resolve()}), log=log)
        result = load_result(out)
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


def choose_operating_point(path: Path, tuning_result: Path, settings: dict, test_scenes: int = TEST_COUNT, test_seed: int | None = None,
                           apart_from: list[tuple[Path, int]] = ()) -> dict:
    """Write the operating point chosen on the tuning scenes (``settings``: steps, learning rates, attention side, bas run
    options) with the seed of the test scenes, drawn now unless given: the test set cannot exist before the choice.

    ``apart_from``: ``(earlier operating point, how many of its test scenes were run)`` for every operating point beside
    ``path`` (``operating-point*.json`` in its folder), whose test scenes have been seen: the new test set is drawn apart
    from those scenes (recorded in the new file, with the ones they were themselves drawn apart from) and named
    ``testN-...`` so that its runs never mix with theirs.  An earlier point left out is refused: a choice made after
    looking at test scenes must not be measured on them."""
    import secrets

    from bas.core import io

    path = Path(path)
    if os.path.lexists(path):  # a link too, dangling or not: never written through
        try:
            old = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            old = {}
        raise click.ClickException(f"{path} already exists (chosen {old.get('chosen', '?')}); an operating point is chosen once, before the "
                                   f"test scenes are seen. Remove it only if no --scenes test run has used it.")
    io.check_output_folder(path.parent, "The folder of --operating-point")  # a file there: one line, not mkdir's traceback
    tuning = load_result(tuning_result)
    if (tuning.get("scene_set") or {}).get("name") != "tuning":
        raise click.ClickException(f"{tuning_result} was not run on the tuning scenes (--scenes tuning); choose the operating point on them.")
    if test_scenes < 12:
        raise click.ClickException(f"--test-scenes {test_scenes} is too few; the test set has at least 12 scenes.")
    given = {Path(p).resolve(): (Path(p), int(n)) for p, n in apart_from}
    for other in sorted(path.parent.glob("operating-point*.json")):
        if other.resolve() not in given:
            raise click.ClickException(f"{other}'s test scenes may have been seen; draw the new test set apart from them with --apart-from "
                                       f"{other}:N (N: how many of its test scenes were run).")
    sets, seen = [], []
    for earlier, count in given.values():
        point = load_operating_point(earlier)
        if count < int(point["test_scenes"]):
            raise click.ClickException(f"--apart-from {earlier}:{count} is fewer than the {point['test_scenes']} test scenes it drew; give how "
                                       f"many of them were run, at least those.")
        scenes, _ = scene_set("test", earlier, count)
        earlier_apart = earlier_test_sets(point)
        sets += [*earlier_apart["sets"], {"operating_point": str(earlier), "chosen": point["chosen"], "test_seed": int(point["test_seed"]),
                                          "test_scenes": count}]
        seen += [*earlier_apart["scenes"], *(s.info() for s in scenes.values())]
    point = {"chosen": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git": git_revision(),
             "tuning_result": {"file": str(tuning_result), "date": tuning.get("date"), "git": tuning.get("git")},
             "settings": settings, "test_scenes": int(test_scenes),
             "test_seed": int(test_seed) if test_seed is not None else secrets.randbelow(2**31)}
    if sets:  # each earlier set once (the first may come through the second's record and be named too), its scenes once
        sets = list({str(Path(s["operating_point"]).resolve()): s for s in sets}.values())
        seen = list({json.dumps(s, sort_keys=True): s for s in seen}.values())
        point.update(test_prefix=f"test{1 + len(sets)}", apart_from={"sets": sets, "scenes": seen})
    try:
        io.create_json(path, point)  # another choice made meanwhile wins: this one is refused, not written over it
    except FileExistsError:
        if not os.path.lexists(path):  # not this path (its folder became a file meanwhile): the OS error, as cli() says it
            raise
        raise click.ClickException(f"{path} was written by another choice while this one ran; an operating point is chosen once.") from None
    return point


def parse_apart_from(ctx, param, values) -> list[tuple[Path, int]]:
    """``--apart-from POINT.json:N`` values."""
    parsed = []
    for value in values:
        name, sep, count = value.rpartition(":")
        if not sep or not count.isdigit() or not Path(name).is_file():
            raise click.BadParameter(f"{value!r} is not POINT.json:N with an existing operating point file and N the test scenes run "
                                     f"(such as benchmarks/operating-point.json:44)")
        parsed.append((Path(name), int(count)))
    return parsed


RUN_SETTINGS = ("phase1_steps", "phase2_steps", "phase1_lr", "phase2_lr", "full_phase2_lr", "phase2_handle_lr", "attention_res", "options", "plugins")


@click.command(cls=Command)
@click.option("--model", default="bas-mini", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: benchmarks/results/fidelity-<date>.json]")
@click.option("--scenes", "scene_set_name", type=click.Choice(SCENE_SETS), default="tuning", show_default=True,
              help="The scene set: tuning (12 drawn scenes, where the operating point is chosen), test (drawn after it; needs "
                   "--operating-point's file, whose settings it runs at), v2 (bas-mini v2's 8 hand-made scenes).")
@click.option("--scene", "scenes", multiple=True, help="Scenes of the set to run, by name [default: all of them].")
@click.option("--ablation", "ablations", multiple=True, type=click.Choice(ABLATION_NAMES), help="Ablations to run (their baselines are added) [default: all].")
@click.option("--variant", "variants", multiple=True, callback=parse_variants,
              help="NAME:KEY=VALUE,...: one more ablation of bas run options against `full` (plugins=a+b; vs=ABLATION or vs=VARIANT to change that), "
                   "on the same scenes and seeds; several make a sweep (repeatable). Only the variants (and their baselines) run "
                   "unless --ablation is also given.")
@click.option("--belongs-to", "table", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The table (result file) this run is a sweep of: its claims are Holm-corrected together with the table's and its other sweeps', "
                   "and all of those files are rewritten.")
@click.option("--phase1-steps", default=200, show_default=True)
@click.option("--phase2-steps", default=200, show_default=True)
@click.option("--extraction-seeds", default=3, show_default=True, help="Extraction seeds per scene and ablation (0..N-1).")
@click.option("--seeds", default=4, show_default=True, help="Generation seeds per prompt (0..N-1).")
@click.option("--sample-steps", default=25, show_default=True, help="DDIM steps per image.")
@click.option("--sample-batch", default=16, show_default=True,
              help="Images sampled at once in bas eval (2.2x faster than one at a time on the 2-core CPU; the same images up to rounding).")
@click.option("--guidance", default=7.5, show_default=True)
@click.option("--attention-res", type=int, default=None, help="Attention-loss map side [default: bas run's, a quarter of the latent side].")
@click.option("--phase1-lr", type=float, default=None, help="[default: bas run's, 5e-4]")
@click.option("--phase2-lr", type=float, default=None, help="Phase-2 learning rate of LoRA [default: bas run's, 1e-4].")
@click.option("--full-phase2-lr", type=float, default=None, help="Phase-2 learning rate of the full fine-tune [default: bas run's, 2e-6].")
@click.option("--phase2-handle-lr", type=float, default=None, help="Phase-2 learning rate of the handles [default: bas run's, 2e-6].")
@click.option("--set", "options", multiple=True, callback=parse_option, help="KEY=VALUE: a bas run option for every run (repeatable).")
@click.option("--plugin", "plugins", multiple=True,
              help="A plugin every run turns on (repeatable), as bas run's --plugin; an ablation that turns it off, or whose weight "
                   "strategy cannot run it (background-anchor with full-finetune), runs without it.")
@click.option("--jobs", default=1, show_default=True, help="Extractions (and evaluations) at a time, each a process with one torch thread.")
@click.option("--work", type=click.Path(path_type=Path), default=None, help="Folder for scenes, runs and images; the same --work resumes [default: a temporary one].")
@click.option("--grids", type=click.Path(path_type=Path), default=None, help="Folder of the grid PNGs [default: --out without .json].")
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder where each finished scene's scores and grid parts are kept (its runs and images are then freed): commit it "
                   "and the benchmark resumes from it on another machine, without --work.")
@click.option("--quiet", is_flag=True, help="No batch progress.")
@click.option("--operating-point", "operating_point", type=click.Path(path_type=Path, dir_okay=False), default=OPERATING_POINT,
              show_default="benchmarks/operating-point.json",
              help="The operating point's file, read by --scenes test, written by --choose-operating-point.")
@click.option("--choose-operating-point", "tuning_result", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TUNING_RESULT.json: write --operating-point from the settings given here (steps, learning rates, --attention-res, --set), "
                   "chosen on that tuning run, with the test scenes' seed drawn now; runs nothing.")
@click.option("--test-scenes", default=TEST_COUNT, show_default=True,
              help="With --choose-operating-point: how many test scenes to draw. With --scenes test: run more than the operating point drew, "
                   "drawn on from its seed (the first are the same).")
@click.option("--test-seed", type=int, default=None, help="With --choose-operating-point: the test scenes' seed [default: drawn at random now].")
@click.option("--apart-from", multiple=True, callback=parse_apart_from,
              help="POINT.json:N, with --choose-operating-point: an earlier operating point whose first N test scenes have been run; the new "
                   "test set is drawn apart from them (repeatable; every operating-point*.json beside --operating-point must be named).")
@click.option("--holm-over", "holm_table", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="TABLE.json [SWEEP.json ...]: recompute the statistics of a table and of all its sweeps as one Holm family and rewrite "
                   "them; runs nothing.")
@click.argument("sweep_files", nargs=-1, type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.pass_context
def main(ctx, model, out, scene_set_name, scenes, ablations, variants, table, phase1_steps, phase2_steps, extraction_seeds, seeds, sample_steps,
         sample_batch, guidance, attention_res, phase1_lr, phase2_lr, full_phase2_lr, phase2_handle_lr, options, plugins, jobs, work, grids, keep, quiet,
         operating_point,
         tuning_result, test_scenes, test_seed, apart_from, holm_table, sweep_files):
    """Run the fidelity benchmark and print its table (or correct a table and its sweeps together: --holm-over;
    or record the operating point chosen on the tuning scenes: --choose-operating-point)."""
    if sweep_files and holm_table is None:
        raise click.UsageError("files were given without --holm-over; the benchmark takes no files (--holm-over TABLE.json SWEEP.json ...).")
    if holm_table is not None:
        size = holm_over(holm_table, list(sweep_files), log=click.echo)
        for path in [holm_table, *sweep_files]:
            click.echo(f"\n{path}:\n" + load_result(path)["table"])
        click.echo(f"\nOne family of {size} claims over {1 + len(sweep_files)} files.")
        return
    rates = {"phase1_lr": phase1_lr, "phase2_lr": phase2_lr, "full_phase2_lr": full_phase2_lr, "phase2_handle_lr": phase2_handle_lr}
    rates = {k: v for k, v in rates.items() if v is not None}
    if tuning_result is not None:
        settings = {"steps": [phase1_steps, phase2_steps], "learning_rates": rates, "attention_res": attention_res, "options": options,
                    **({"plugins": list(plugins)} if plugins else {})}
        point = choose_operating_point(operating_point, tuning_result, settings, test_scenes, test_seed, apart_from)
        click.echo(f"Wrote {operating_point}: chosen {point['chosen']}, {json.dumps(settings)}; the test set ({test_scenes} scenes) is drawn now.")
        return
    if scene_set_name == "test":  # the operating point's settings, unless given (which must then be the same)
        settings = load_operating_point(operating_point)["settings"]
        from bas.extraction.command import given_options

        given = given_options(ctx) & set(RUN_SETTINGS)
        phase1_steps = phase1_steps if "phase1_steps" in given else settings["steps"][0]
        phase2_steps = phase2_steps if "phase2_steps" in given else settings["steps"][1]
        rates = {**{k: v for k, v in settings["learning_rates"].items() if k not in given}, **rates}
        attention_res = attention_res if "attention_res" in given else settings["attention_res"]
        options = options if "options" in given else settings["options"]
        plugins = plugins if "plugins" in given else settings.get("plugins", [])
    import torch

    torch.set_num_threads(1)
    out = out or RESULTS / f"fidelity-{datetime.date.today().isoformat()}.json"
    result = run_benchmark(out, model=model, scenes=list(scenes) or None, ablations=list(ablations) or None, variants=list(variants),
                           steps=(phase1_steps, phase2_steps), extraction_seeds=list(range(extraction_seeds)), seeds=list(range(seeds)),
                           sample_steps=sample_steps, sample_batch=sample_batch, guidance=guidance, attention_res=attention_res, options=options,
                           plugins=list(plugins), learning_rates=rates, jobs=jobs, work=work, grids=grids, quiet=quiet,
                           scene_set_name=scene_set_name, table=table, operating_point=operating_point, keep=keep,
                           test_scenes=test_scenes if ctx.get_parameter_source("test_scenes") != click.core.ParameterSource.DEFAULT else None,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    click.echo(result["table"])
    for extra in ("claims_table", "targets_table"):
        if result.get(extra):
            click.echo("\n" + result[extra])
    click.echo(f"Took {result['times']['total_s'] / 60:.1f} min. Wrote {out}")


def cli() -> None:
    """The command line: ``main``, whose known failures (bas's own errors such as a bad option in a run line, a full disk,
    out of memory: :func:`bas.core.failures.known_failure`) are one Error line and exit 1 (:class:`benchmarks.commandline.Command`)."""
    main()


if __name__ == "__main__":
    cli()
