"""How far the handles move in phase 2 relative to phase 1 (issue 10: phase 2's handle rate).

    python -m benchmarks.handle_drift --out benchmarks/results/handle-drift-<date>.json

Extracts bas-mini's purple-orange scene (as ``bas demo`` draws it) with bas run's learning rates,
LoRA with the handles at the LoRA rate (1e-4, bas before ``--phase2-handle-lr``) and at
``--phase2-handle-lr 2e-6`` (the reference code's rate, now the default), and the full fine-tune,
and records the Euclidean distance the handle rows travel in each phase (all handles, all text
encoders, as one vector).  The run is deterministic (seeded, CPU), so one run per setting is the
figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

import bas
from benchmarks.commandline import Command


class HandleSnapshots:
    """An observer plugin: the handle rows at the start and end of each phase."""

    def __init__(self):
        self.rows = {}

    def _rows(self, run):
        return torch.cat([p.detach().float().flatten() for p in run.handle_params]).clone()

    def on_phase_start(self, run, phase):
        self.rows[f"start{phase}"] = self._rows(run)

    def on_phase_end(self, run, phase):
        self.rows[f"end{phase}"] = self._rows(run)

    @bas.hookimpl
    def bas_register_observers(self, register):
        register("handle-snapshots", lambda config: self)


SETTINGS = {  # name -> (weight strategy plugins, phase-2 handle rate)
    "lora, handles at 1e-4 (the LoRA rate)": ([], 1e-4),
    "lora, handles at 2e-6 (--phase2-handle-lr default)": ([], 2e-6),
    "full fine-tune, handles at 2e-6": (["full"], 2e-6),
}


@click.command(cls=Command)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="Steps per phase.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/bas-handle-drift"), show_default=True)
def main(out, steps, work):
    from bas.core import io
    from bas.core.api import make_config
    from bas.demo.demo import draw_mini_scene
    from bas.core.plugins import Plugins
    from bas.core.training import extract

    io.check_output_file(out, "--out")  # before the runs, not after them
    io.check_output_folder(work, "--work")
    torch.set_num_threads(1)
    scene = draw_mini_scene(work / "scene")
    results = {"model": "bas-mini", "scene": "purple-orange", "steps": [steps, steps], "settings": {}}
    for name, (plugins, handle_lr) in SETTINGS.items():
        snapshots = HandleSnapshots()
        names = ["no:report", "no:checkpoints", *plugins]
        pm = Plugins(names, extra=[("handle-snapshots", snapshots)])
        values = dict(image=scene / "img.png", masks=[scene / "mask0.png", scene / "mask1.png"], out=work / "run", model="bas-mini",
                      phase1_steps=steps, phase2_steps=steps, init_tokens=["circle", "square"], overwrite=True, quiet=True,
                      device="cpu", phase2_handle_lr=handle_lr, model_defaults=False)  # bas run's own defaults, as measured
        extract(make_config(pm, values, names), pm)
        r = snapshots.rows
        phase1, phase2 = float((r["end1"] - r["start1"]).norm()), float((r["end2"] - r["start2"]).norm())
        results["settings"][name] = {"phase1_distance": phase1, "phase2_distance": phase2, "phase2_over_phase1": phase2 / phase1}
        click.echo(f"{name}: phase 2 moves the handles {100 * phase2 / phase1:.2f}% as far as phase 1", err=True)
    io.write_text(out, json.dumps(results, indent=1) + "\n")  # whole or not at all


if __name__ == "__main__":
    main()
