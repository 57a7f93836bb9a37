"""``bas eval``: the command line of :mod:`bas.evaluation.evaluate`."""

from __future__ import annotations

from pathlib import Path

import click


def eval_command(command_class: type[click.Command]) -> click.Command:
    """The ``bas eval`` command, built on ``command_class`` (bas's command that adds the options of the
    plugins named with ``--plugin`` before parsing); here the options come from ``bas_eval_options``."""
    from bas.generation.generate import SCHEDULERS
    from bas.core.model import PRECISIONS

    class EvalCommand(command_class):
        takes_model = False

        def plugin_options(self, plugins):
            from bas.evaluation.evaluate import eval_options

            return eval_options(plugins)

    @click.command("eval", cls=EvalCommand)
    @click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))  # none: a usage error (exit 2), as for every command
    @click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for eval.json, eval.csv, index.html and images/.")
    @click.option("--prompts", type=click.Path(path_type=Path), default=None,
                  help="A file of prompts naming handles (<asset0>) or templates ({} for every subset of the handles), one per line.")
    @click.option("--templates", default=None,
                  help="Template set, each over every subset of the handles: paper (10 contexts), or one an evaluator offers such as "
                       "bas-mini [default: the evaluators' preferred set, else paper; none with --prompts alone].")
    @click.option("--num-images", type=int, default=4, show_default=True, help="Images per prompt, seeds --seed, --seed+1, ...")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Images sampled at once: faster where memory allows; each from its own seed, the same image up to rounding.")
    @click.option("--evaluator", "evaluators", multiple=True,
                  help="An evaluator (repeatable): clip-prompt, dino-identity, bas-mini, or one a plugin adds [default: those meant for each run].")
    @click.option("--images", type=click.Path(path_type=Path), default=None,
                  help="Score images already generated (named as bas generate names them; a folder per run when several) instead of generating.")
    @click.option("--class-word", "class_words", multiple=True,
                  help="The class word of each concept in handle order, replacing the handles in prompts [default: the run's --init-token words].")
    @click.option("--steps", type=int, default=None, help="Sampling steps per image [default: each run's: the paper's 50; 4 for FLUX.1-schnell].")
    @click.option("--guidance", type=float, default=None,
                  help="Guidance scale [default: each run's family's: 7.5 for SD and SDXL (the paper's), 3.5 for FLUX.1-dev, 0 for schnell (it has none)].")
    @click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default=None,
                  help="Sampler [default: each run's family's: ddim for SD and SDXL (the paper's), flow-euler for FLUX].")
    @click.option("--device", default="auto", show_default=True, help="For generation and the evaluators' models.")
    @click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
    @click.option("--overwrite", is_flag=True, help="Replace an earlier bas eval in --out.")
    @click.option("--quiet", is_flag=True, help="Hide the progress bars.")
    @click.option("--plugin", "-p", "plugin_names", multiple=True, help="Turn on an installed plugin (one that adds an evaluator).")
    @click.pass_context
    def evaluate(ctx, plugin_names, **values):
        """Score runs with the paper's metrics: bas eval runs/* --out eval.

        Generates each run's prompts (templates x every subset of its handles) with `bas generate`'s
        sampler, scores every image with each evaluator and writes eval.json, eval.csv and index.html
        (a row per run: mean and 95% bootstrap interval per metric; the images sorted by score).
        Entries that are not runs (batch.json, index.html) are skipped.
        """
        from bas.evaluation.outputs import summary_lines
        from bas.evaluation.evaluate import evaluate as run_evaluation, make_eval_config

        plugins = ctx.meta["bas.plugins"]
        data = run_evaluation(make_eval_config(plugins, values, plugin_names), plugins)
        for note in data["notes"]:
            click.echo(f"Note: {note}", err=True)
        for line in summary_lines(data):
            click.echo(line)
        click.echo(f"Wrote {values['out']}: eval.json, eval.csv, index.html ({len(data['images'])} images scored).")

    return evaluate
