"""``bas edit``."""

from __future__ import annotations

from pathlib import Path

import click

from bas.core.errors import BasError
from bas.generation.command import read_prompts, sampling_options


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("prompts", nargs=-1)
@click.option(
    "--image",
    required=True,
    type=click.Path(path_type=Path),
    help="The image to edit (centre-cropped to the output's aspect and resized, as `bas run` does).",
)
@click.option("--mask", required=True, type=click.Path(path_type=Path), help="PNG, white where the prompt's content goes.")
@sampling_options
@click.option(
    "--blend-start",
    type=float,
    default=0.25,
    show_default=True,
    help="Fraction of the schedule skipped: sampling starts from pure noise this far in (the script's --blending_start_percentage).",
)
@click.option("--composite", is_flag=True, help="Paste the input's pixels outside the mask over the result (beyond the reference script).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, help="Where to write PNGs [default: OUT/edits].")
def edit(out, prompts, prompts_file, num_images, **options):
    """Put a concept into a region of any image: bas edit OUT --image IMG --mask M "a photo of <asset1>".

    Blended Latent Diffusion as the paper's reference script runs it: a quarter into the schedule,
    the prompt is generated inside the mask while outside it the image's latents, noised afresh,
    replace the sample's after every step.
    """
    from bas.editing.edit import edit_images

    prompts = read_prompts(prompts, prompts_file)
    if not prompts:
        raise BasError('No prompt; pass one such as "a photo of <asset1>" or --prompts-file FILE.')
    for path in edit_images(out, prompts, num_images=num_images or 1, **options):
        click.echo(str(path))
