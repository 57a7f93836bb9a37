"""``bas export``."""

from __future__ import annotations

from pathlib import Path

import click

from bas.core.model import PRECISIONS
from bas.exports.export import FORMATS as EXPORT_FORMATS
from bas.generation.command import COUNT


@click.command("export")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    default="diffusers",
    show_default=True,
    help="diffusers; kohya (AUTOMATIC1111, ComfyUI); lora-from-full (a full fine-tune as a LoRA).",
)
@click.option("--out", "dest", required=True, type=click.Path(path_type=Path), help="Folder to write the export into.")
@click.option("--rank", type=int, default=32, show_default=True, help="Rank of a LoRA made from a full fine-tune by low-rank difference.")
@click.option("--name", default=None, help="Name of the kohya LoRA file and embedding prefix [default: the run folder's name].")
@click.option(
    "--preview/--no-preview",
    default=True,
    show_default=True,
    help="Put a preview.png in the export: the newest validation grid of the run's report, or one generated when it has none.",
)
@click.option(
    "--preview-steps",
    type=COUNT,
    default=None,
    help="Sampling steps of a generated preview (with the run's family's sampler and guidance, as bas generate's defaults) "
    "[default: 25, or bas generate's steps for the run where fewer: 4 for FLUX.1-schnell].",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
def export(out, fmt, dest, **options):
    """Export a run for diffusers, AUTOMATIC1111 or ComfyUI: bas export OUT --format kohya --out DIR."""
    from bas.exports.export import export_run

    written = export_run(out, fmt, dest, **options)
    top = sorted({p.relative_to(dest).parts[0] + ("/" if len(p.relative_to(dest).parts) > 1 else "") for p in written})
    click.echo(f"Wrote {dest}: {', '.join(top)}. See {dest / 'README.md'}.")
