"""``bas generate``, and the options and parsers it shares with ``bas edit``."""

from __future__ import annotations

import math
from pathlib import Path

import click

from bas.core.checks import MAX_SEED
from bas.core.errors import BasError
from bas.core.model import PRECISIONS
from bas.generation.generate import SAMPLING_STEPS, SCHEDULERS


def parse_seeds(ctx, param, value):
    """``1,7,42`` as integers; their range is checked where the Python API checks it too
    (:func:`bas.generation.generate.sampling_seeds`)."""
    if not value:
        return None
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers such as 1,7,42.") from None
    if not seeds:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of seeds such as 1,7,42.")
    return seeds


def finite(ctx, param, value):
    """NaN and infinities pass click's float type; no option of bas means them."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number.")
    return value


SEED = click.IntRange(0, MAX_SEED)
COUNT = click.IntRange(min=1)


def sampling_options(command):
    """The options generate and edit share."""
    for option in reversed(
        [
            click.option(
                "--num-images", type=COUNT, default=None, help="Images per prompt, seeds seed, seed+1, ... [default: 4 for generate, 1 for edit]."
            ),
            click.option("--seed", type=int, default=0, show_default=True, help=f"The first seed, 0 to {MAX_SEED}."),
            click.option(
                "--seeds",
                callback=parse_seeds,
                default=None,
                help="Exact seeds, comma-separated (such as 1,7,42); overrides --seed and --num-images.",
            ),
            click.option(
                "--steps",
                type=COUNT,
                default=None,
                help=f"Sampling steps [default: {SAMPLING_STEPS}; 4 for a FLUX.1-schnell run, as its model card].",
            ),
            click.option(
                "--guidance",
                type=float,
                default=None,
                callback=finite,
                help="Guidance scale: classifier-free, or FLUX.1-dev's distilled guidance [default: 7.5; flux 3.5, schnell 0 (it has none)].",
            ),
            click.option(
                "--scheduler",
                type=click.Choice(list(SCHEDULERS)),
                default=None,
                help="Sampler [default: ddim, the paper's; flow-euler for flux, the one flow-matching sampler].",
            ),
            click.option("--width", type=int, default=None, help="Image width, a multiple of 8 [default: the run's resolution]."),
            click.option("--height", type=int, default=None, help="Image height, a multiple of 8 [default: the run's resolution]."),
            click.option(
                "--prompts-file", type=click.Path(path_type=Path), default=None, help="A text file with one prompt per line (# starts a comment)."
            ),
            click.option("--negative-prompt", default=None, help="What the images should not show."),
            click.option(
                "--lora-scale",
                type=float,
                default=1.0,
                show_default=True,
                callback=finite,
                help="Strength of the run's LoRA (0: base model + handles).",
            ),
            click.option("--device", default="auto", show_default=True),
            click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True),
        ]
    ):
        command = option(command)
    return command


def read_prompts(prompts, prompts_file) -> list[str]:
    from bas.generation.generate import read_prompts_file

    return list(prompts) + (read_prompts_file(prompts_file) if prompts_file else [])


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("prompts", nargs=-1)
@sampling_options
@click.option("--variations", is_flag=True, help="Add the prompt naming every handle: variations of the whole scene.")
@click.option("--grid/--no-grid", default=True, show_default=True, help="Also write a grid (a row per prompt, a column per seed).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, help="Where to write PNGs [default: OUT/samples].")
@click.option(
    "--batch-size",
    type=COUNT,
    default=1,
    show_default=True,
    help="Images sampled at once: faster where memory allows; each from its own seed, the same image up to rounding.",
)
def generate(out, prompts, prompts_file, variations, num_images, **options):
    """Generate images from a finished run: bas generate OUT "a photo of <asset0> at the beach"."""
    from bas.generation.generate import all_handles_prompt, generate_images, read_run

    prompts = read_prompts(prompts, prompts_file)
    if variations:
        prompts.append(all_handles_prompt(read_run(out)["handles"]))
    if not prompts:
        raise BasError('No prompt; pass one such as "a photo of <asset0> at the beach", --prompts-file FILE or --variations.')
    for path in generate_images(out, prompts, num_images=num_images or 4, **options):
        click.echo(str(path))
