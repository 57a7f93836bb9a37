"""Record what benchmarks/fidelity.py's scoring gave BEFORE its metrics moved behind the bas-mini evaluator.

Run once at commit a475c50 (the code before the move) from the repository root:
``python tests/data/fidelity-before/record.py``.  It extracts one benchmark scene on bas-mini with a short
schedule, generates the benchmark's prompts over two seeds, and adds two drawn columns per prompt (the
right answer, and each concept drawn in the next concept's colour), so that every metric takes more than one
value.  It keeps the images and the scene here and writes ``numbers.json`` with the per-column values the
benchmark's ``score_images`` computes from them.  tests/test_eval.py checks that
the bas-mini evaluator gives the same values on these stored images.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from bas.mini import metrics, world  # noqa: E402
from benchmarks import fidelity  # noqa: E402

SCENE, SEEDS, STEPS = "pink-cyan-orange", [0, 1], (100, 100)
COLUMNS = ["seed0", "seed1", "drawn-right", "drawn-swapped"]


def drawn(scene: world.Scene, spec: dict, swap: bool):
    """The image a perfect model would draw for a prompt's spec, or one with each concept in the next one's colour."""
    import random

    objs = scene.objects
    chosen = spec.get("concepts", [spec.get("concept")])
    objects = [(objs[(k + 1) % len(objs)].colour if swap else objs[k].colour, objs[k].shape, objs[k].texture) for k in chosen]
    background = spec.get("background", scene.background)
    return world.render(world.random_scene(random.Random(len(chosen)), objects=objects, background=background))[0]


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        scene_dir, scene = fidelity.make_scene(Path(tmp) / "scenes", SCENE)
        full = next(a for a in fidelity.ABLATIONS if a.name == "full")
        result = fidelity.run_ablation(full, scene_dir, scene, Path(tmp) / "runs", model="bas-mini", steps=STEPS, seeds=SEEDS,
                                       sample_steps=20, guidance=7.5, attention_res=4,
                                       learning_rates={"phase1_lr": 5e-3, "phase2_lr": 1e-3})
        (HERE / "scene").mkdir(exist_ok=True)
        for f in sorted(scene_dir.iterdir()):
            shutil.copy(f, HERE / "scene" / f.name)
    groups = fidelity.prompts_for(len(scene.objects), scene.background)
    specs = {p: spec for items in groups.values() for p, spec in items}
    (HERE / "images").mkdir(exist_ok=True)
    images, readings = [], {}
    for i, prompt in enumerate(result["prompts"]):
        column = [result["images"][i * len(SEEDS) + k] for k in range(len(SEEDS))]
        column += [drawn(scene, specs[prompt], swap=False), drawn(scene, specs[prompt], swap=True)]
        readings[prompt] = []
        for name, image in zip(COLUMNS, column):
            file = f"{i:02d}-{name}.png"
            image.save(HERE / "images" / file)
            images.append({"file": file, "prompt": prompt, "column": name})
            from PIL import Image

            readings[prompt].append(metrics.read_image(Image.open(HERE / "images" / file).convert("RGB")))
    per_column = fidelity.score_images(scene, groups, readings)
    assert all(per_column[m][:2] == result["per_seed"][m] for m in per_column)  # the stored PNGs read as generated
    numbers = {"commit": "a475c50", "scene": SCENE, "seeds": SEEDS, "steps": list(STEPS), "prompts": result["prompts"],
               "groups": {g: [p for p, _ in items] for g, items in groups.items()},
               "columns": COLUMNS, "images": images, "per_column": per_column}
    (HERE / "numbers.json").write_text(json.dumps(numbers, indent=1) + "\n")
    print(json.dumps(per_column, indent=1))


if __name__ == "__main__":
    main()
