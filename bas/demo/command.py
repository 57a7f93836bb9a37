"""``bas tiny-model`` and ``bas demo``."""

from __future__ import annotations

from pathlib import Path

import click

from bas.core.plugins import Plugins
from bas.generation.command import COUNT, SEED


@click.command("tiny-model")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default="epsilon", show_default=True)
@click.option("--family", default=None, help="Model family of the pipeline: sd, sdxl, flux, or one a plugin adds [default: sd, the default model's].")
@click.option("--overwrite", is_flag=True, help="Replace a model folder already at DIRECTORY (never a folder of anything else).")
def tiny_model(directory, seed, prediction_type, family, overwrite):
    """Write a tiny random pipeline of a model family (diffusers format) for offline tests."""
    from bas.core.family import default_family, get_family
    from bas.demo.tiny import check_model_target, save_tiny_model

    check_model_target(directory, overwrite)  # before the model is built
    plugins = Plugins()
    chosen = get_family(plugins, family) if family else default_family(plugins)
    save_tiny_model(directory, seed=seed, prediction_type=prediction_type, family=chosen, overwrite=overwrite)
    click.echo(f"Wrote {directory} (loads with {chosen.pipeline_class}.from_pretrained).")


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("bas-demo"), show_default=True)
@click.option("--steps", type=COUNT, default=100, show_default=True, help="Steps per phase.")
@click.option("--model", default="bas-mini", show_default=True, help="bas-mini (shipped), or a pipeline folder such as one `bas tiny-model` writes.")
def demo(out, steps, model):
    """Offline demo: draw a scene of concepts bas-mini cannot name, extract them, recompose them."""
    from PIL import Image

    from bas.core.api import extract
    from bas.generation.generate import generate as generate_api
    from bas.demo.demo import DEMO_PROMPTS, check_demo_out, contact_sheet, draw_mini_scene
    from bas.mini import NAME

    check_demo_out(out)
    click.echo(f"Drawing a scene in {out / 'scene'} and extracting its two concepts into {model} ...")
    scene = draw_mini_scene(out / "scene")
    # bas-mini's 64-d embeddings and small UNet move too little in 100 steps at Stable Diffusion's learning rates
    extra = {"phase1_lr": 5e-3, "phase2_lr": 1e-3} if model == NAME else {}
    result = extract(
        scene / "img.png",
        [scene / "mask0.png", scene / "mask1.png"],
        out / "run",
        model=model,
        phase1_steps=steps,
        phase2_steps=steps,
        init_tokens=["circle", "square"],
        overwrite=True,
        device="cpu",
        model_defaults=False,  # the demo's own settings, chosen to finish in under a minute on a laptop CPU
        **extra,
    )
    paths = generate_api(out / "run", [p for _, p in DEMO_PROMPTS], num_images=2, steps=25, grid=False, device="cpu")
    labels = [f"{label} #{k}" for label, _ in DEMO_PROMPTS for k in range(2)]  # generate's order: per prompt, its images
    tiles = [("input", Image.open(scene / "img.png"))] + [(f"mask{i}", Image.open(scene / f"mask{i}.png")) for i in range(2)]
    tiles += [(label, Image.open(path)) for label, path in zip(labels, paths)]
    contact_sheet(out / "demo.png", tiles)
    t = result.info["times"]
    click.echo(f"Extraction took {t['total_s']:.1f}s. Wrote {out / 'run'} and {len(paths)} images; overview: {out / 'demo.png'}")
    if model == NAME:
        click.echo(
            "bas-mini never saw purple, orange or dots in its captions: what it draws for the handles it learned from this one "
            "image. It is a 5M-parameter model trained on a CPU: expect a concept's colour and shape, its texture less often (docs/bas-mini.md)."
        )
