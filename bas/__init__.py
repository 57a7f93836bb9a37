"""bas: extract several concepts from one image into a text-to-image diffusion model (Break-A-Scene)."""

from bas.core.hookspecs import hookimpl
from bas.core.version import __version__


def extract(*args, **kwargs):
    """Extract concepts from one image; see :func:`bas.core.api.extract`."""
    from bas.core.api import extract as _extract

    return _extract(*args, **kwargs)


def generate(*args, **kwargs):
    """Generate images with a run's handles; see :func:`bas.generation.generate.generate`."""
    from bas.generation.generate import generate as _generate

    return _generate(*args, **kwargs)


def export(out, dest, fmt="diffusers", **options):
    """Export a run into the folder ``dest`` for diffusers (``fmt="diffusers"``), AUTOMATIC1111 or
    ComfyUI (``"kohya"``), or a full fine-tune as a LoRA (``"lora-from-full"``); see
    :func:`bas.exports.export.export_run`."""
    from bas.exports.export import export_run

    return export_run(out, fmt, dest, **options)


def evaluate(runs, out, **options):
    """Score finished runs with the paper's metrics into the folder ``out`` (``bas eval``); returns what
    ``eval.json`` holds; see :func:`bas.evaluation.evaluate.evaluate_runs`."""
    from bas.evaluation.evaluate import evaluate_runs

    return evaluate_runs(runs, out, **options)


def edit(out, prompt, image, mask, **options):
    """Put a run's concept into the masked region of an image; see :func:`bas.editing.edit.edit_images`."""
    from bas.editing.edit import edit_images

    return edit_images(out, prompt, image, mask, **options)


def batch(scenes, out, executor="local", **options):
    """Extract many scenes into ``out/<name>/`` on this machine (``executor="local"``, ``workers=N``)
    or a Ray cluster (``"ray"``, ``ray_address=...``) and return the summary ``batch.json`` holds;
    see :func:`bas.batches.runner.run_batch`."""
    from bas.batches.runner import run_batch

    return run_batch(scenes, out, executor=executor, **options)


__all__ = ["batch", "edit", "evaluate", "export", "extract", "generate", "hookimpl", "__version__"]
