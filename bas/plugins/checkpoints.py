"""Periodic checkpoints under OUT/checkpoints/, so `bas run ... --resume` continues an interrupted run."""

from __future__ import annotations

import click

from bas import hookimpl
from bas.core.errors import BasError


class Checkpointer:
    def __init__(self, config):
        self.every = config.options.get("checkpoint_every", 100)
        if self.every < 0:
            raise BasError(f"--checkpoint-every must be 0 (off) or a positive number of steps, not {self.every}.")

    def on_step(self, run, step):
        if step.step % self.every == 0 and step.step < step.total_steps:
            run.save_checkpoint()

    def on_phase_end(self, run, phase):
        if phase == 1 and run.config.phase2_steps:  # phase 2 then resumes from its start, not mid phase 1
            run.save_checkpoint()


@hookimpl
def bas_run_options():
    return [click.Option(["--checkpoint-every"], type=int, default=100, show_default=True,
                         help="Save a resumable checkpoint every N steps (0: only on Ctrl-C and errors).")]


@hookimpl
def bas_register_observers(register):
    register("checkpoints", lambda config: Checkpointer(config) if config.options.get("checkpoint_every", 100) else None,
             description="resumable checkpoints every --checkpoint-every steps")
