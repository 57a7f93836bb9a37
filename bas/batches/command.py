"""``bas batch SCENES... --out DIR``: every option of ``bas run`` (for every scene), the
executors' options, and what a batch adds (``--executor``, ``--retries``, ``--overwrite``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

# bas run's options that name one scene or one output folder: a batch has its own
SCENE_OPTIONS = {"image", "out", "resume", "overwrite", "masks", "scene"}
# and those that plan one run instead of running it (`bas run --plan`, `--vram`: docs/speed-memory.md)
PLAN_OPTIONS = {"plan_only", "as_json", "vram"}
SHOWN_FAILURES = 20


def make_batch_command(run: click.Command) -> click.Command:
    """The ``bas batch`` command, taking ``run``'s options (the ``bas run`` command) except those
    naming one scene, and the options plugins add to ``bas run`` and ``bas batch``."""

    class BatchCommand(type(run)):
        def plugin_options(self, plugins):
            run_options = [(p, o) for p, o in super().plugin_options(plugins) if o.name not in SCENE_OPTIONS]
            return plugins.batch_options() + run_options

    own = [
        click.Argument(["scenes"], nargs=-1, type=click.Path(path_type=Path)),
        click.Option(["--out"], required=True, type=click.Path(path_type=Path), help="Folder for the runs (one sub-folder per scene), batch.json and index.html."),
        click.Option(["--executor"], default="local", show_default=True, help="Where scenes run: local (processes on this machine), ray (a Ray cluster), or one a plugin adds."),
        click.Option(["--retries"], type=int, default=1, show_default=True, help="Run a scene again this many times when its process dies (it resumes from its checkpoint)."),
        click.Option(["--overwrite"], is_flag=True, help="Run again scenes whose folder holds a finished run made with other options, and start interrupted ones over."),
    ]
    params = own + [p for p in run.params if p.name not in SCENE_OPTIONS | PLAN_OPTIONS and not getattr(p, "_from_plugin", False)]
    return BatchCommand("batch", params=params, callback=click.pass_context(_batch), help=HELP, short_help="Run many scenes: on this machine's GPUs or a Ray cluster.")


HELP = """Extract many scenes: bas batch scenes/* --out runs [any bas run option].

Each SCENE is a scene folder (img.jpg, mask0.png, mask1.png, ...: the layout `bas run --scene`
takes) or a manifest, .jsonl or .csv, with one scene per line: image, masks, init_tokens, name,
plugins and any option of `bas run` for that scene. Each scene's run goes to OUT/NAME, exactly as
`bas run` writes it; OUT/batch.json sums up every scene and OUT/index.html shows them.

Running the same command again skips finished scenes, resumes interrupted ones from their
checkpoints and retries failed ones. The exit code is 1 when any scene did not finish.
"""


def _batch(ctx, scenes, out, executor, retries, overwrite, plugin_names, **values):
    from bas.batches.runner import Batch

    # only the options given on the command line: a manifest line's own value wins over a default
    given = {k: v for k, v in values.items() if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    quiet = bool(given.pop("quiet", False))
    batch = Batch(scenes, out, executor, list(plugin_names), overwrite, retries, quiet, given)
    summary = batch.run()
    report(summary)


def report(summary: dict) -> None:
    """The outcome in a few lines on stdout; exit code 1 when any scene did not finish."""
    out = Path(summary["out"])
    scenes = summary["scenes"]
    counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items())
    click.echo(f"{len(scenes)} scene(s) in {out}: {counts}. Summary: {out / 'batch.json'}; gallery: {out / 'index.html'}")
    for scene in scenes:
        if scene.get("replaced") and scene["status"] == "done":
            click.echo(f"  {scene['name']} ({scene['status']}): run again (--overwrite), as {scene['replaced']}.")
    bad = [s for s in scenes if s["status"] not in ("done", "skipped")]
    for scene in bad[:SHOWN_FAILURES]:
        click.echo(f"  {scene['name']} ({scene['status']}): {scene.get('error') or ''}")
    if len(bad) > SHOWN_FAILURES:
        click.echo(f"  ... and {len(bad) - SHOWN_FAILURES} more in batch.json")
    if bad:
        sys.exit(1)
