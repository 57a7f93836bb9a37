"""A progress bar per phase with the loss and steps per second."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from bas import hookimpl


class ProgressBar:
    def __init__(self, config):
        self.bar = None
        self.disable = config.options.get("quiet", False)

    def on_phase_start(self, run, phase):
        total = run.config.phase1_steps if phase == 1 else run.config.phase2_steps
        what = "handles" if phase == 1 else f"handles + {run.resolved.strategy_name}"
        self.bar = tqdm(total=total, desc=f"phase {phase} ({what})", unit="step", file=sys.stderr, disable=self.disable, dynamic_ncols=True)

    def on_step(self, run, step):
        self.bar.set_postfix(loss=f"{step.loss:.4f}", refresh=False)
        self.bar.update(1)

    def on_phase_end(self, run, phase):
        self.bar.close()

    def on_run_failed(self, run, error):
        if self.bar is not None:  # end the bar's line: the error message starts on a line of its own
            self.bar.close()


@hookimpl
def bas_register_observers(register):
    register("progress", ProgressBar, description="tqdm bar: phase, step, loss, steps/s")


@hookimpl
def bas_run_options():
    import click

    return [click.Option(["--quiet"], is_flag=True, default=False, help="Hide the progress bar.")]
