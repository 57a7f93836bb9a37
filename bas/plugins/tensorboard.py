"""TensorBoard logging, as diffusers' training scripts do it: ``--plugin tensorboard``.

Per step the total loss and each weighted term under ``train/`` (x axis: the step counted over
both phases), the seconds per step, the phase; at the start the run's options as text; the
report plugin's validation grids as images.  ``tensorboard --logdir OUT/logs`` shows them.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from bas import hookimpl
from bas.generation.generate import slug


class TensorBoardLogger:
    def __init__(self, config):
        self.logdir = config.options.get("logging_dir")
        self.writer = None

    def global_step(self, run, phase: int, step: int) -> int:
        return step + (run.config.phase1_steps if phase == 2 else 0)

    def on_run_start(self, run):
        from torch.utils.tensorboard import SummaryWriter

        logdir = Path(self.logdir or run.out / "logs")
        if not self.logdir and not run.config.resume:  # an overwritten run's curves would mix with these
            for old in logdir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.writer.add_text("config", "```\n" + json.dumps(run.config.to_json(), indent=2, default=str) + "\n```")

    def on_step(self, run, step):
        g = self.global_step(run, step.phase, step.step)
        self.writer.add_scalar("train/loss", step.loss, g)
        for name, value in step.terms.items():
            self.writer.add_scalar(f"train/{name}", value, g)
        self.writer.add_scalar("train/phase", step.phase, g)
        self.writer.add_scalar("train/seconds_per_step", step.seconds, g)

    def on_images(self, run, phase, step, images):
        g = self.global_step(run, phase, step)
        for prompt, row in images.items():
            strip = np.concatenate([np.asarray(im.convert("RGB")) for im in row], axis=1)
            self.writer.add_image(f"validation/{slug(prompt, 80)}", strip, g, dataformats="HWC")

    def on_phase_end(self, run, phase):
        self.writer.flush()

    def on_run_end(self, run):
        self.writer.close()

    def on_run_failed(self, run, error):
        if self.writer is not None:
            self.writer.close()


@hookimpl
def bas_run_options():
    # a path type, so that bas refuses a --logging-dir inside --out (replaced as a whole at the end)
    return [click.Option(["--logging-dir"], type=click.Path(path_type=Path), default=None, help="TensorBoard log folder [default: OUT/logs].")]


@hookimpl
def bas_register_observers(register):
    register("tensorboard", TensorBoardLogger, description="loss terms and validation images to TensorBoard (OUT/logs)")
