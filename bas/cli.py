"""The ``bas`` command line: run, generate, demo, tiny-model, plugins (and commands from plugins)."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path

import click

import bas
from bas.core.batch.command import make_batch_command
from bas.core.checks import MAX_SEED
from bas.core.errors import BasError, command_line
from bas.core.export import FORMATS as EXPORT_FORMATS
from bas.core.generation import SAMPLING_STEPS, SCHEDULERS
from bas.core.model import PRECISIONS
from bas.core.plugins import REGISTER_HOOKS, Plugins, available_plugin_names, shadowed_entry_points
from bas.eval_cli import eval_command
from bas.ui.command import ui as ui_command

PLUGIN_FLAGS = ("--plugin", "-p")
# exit codes (README, "Errors and exit codes"): the same failure exits with the same code from every command
EXIT_ERROR = 1  # one `Error: ...` line: bad input or option values (whether click or bas checks them), a damaged folder, the machine's limits, a plugin's fault
EXIT_USAGE = 2  # a command line that cannot be read: an unknown option or command, a missing argument or option, an extra argument
EXIT_INTERRUPTED = 130  # Ctrl-C


def _quiet_libraries() -> None:
    """Library chatter (deprecation notes, load bars) drowns bas's own progress and errors."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    for name in ("bitsandbytes", "transformers", "diffusers", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.formatwarning = lambda message, category, *a, **k: f"Warning: {message}\n"


def close_progress_bars() -> None:
    """End every open progress bar's line, so an error that follows starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class BasGroup(click.Group):
    """bas's commands, then commands from plugins; user errors become one ``Error: ...`` line.

    Plugins' commands are looked up only for a name that is not bas's own, so an installed
    plugin is not even imported to run ``bas run``, ``bas generate``, ...; it can neither replace
    a command nor end the process by being installed (:func:`add_plugin_commands`).
    """

    plugins_loaded = False

    def load_plugin_commands(self) -> None:
        if not self.plugins_loaded:
            self.plugins_loaded = True
            for warning in add_plugin_commands(self):
                click.echo(f"Warning: {warning}", err=True)

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None:
            self.load_plugin_commands()
            command = super().get_command(ctx, name)
        return command

    def list_commands(self, ctx):
        self.load_plugin_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx):
        from bas.core.failures import known_failure
        from bas.core.training import Interrupted

        try:
            return super().invoke(ctx)
        except Interrupted as exc:
            close_progress_bars()
            click.echo(str(exc), err=True)
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            close_progress_bars()
            click.echo("Interrupted; nothing was saved.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.BadParameter as exc:
            if not isinstance(exc, click.MissingParameter):  # a value click's type or range refuses: as bas's own checks of values
                exc.exit_code = EXIT_ERROR
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # a user's error, the machine's limits, a plugin's fault: one line; a bug keeps its traceback
            error = known_failure(exc)
            if error is None:
                raise
            close_progress_bars()
            raise click.ClickException(str(error)) from None


def prescan_plugins(args: list[str]) -> list[str]:
    """The ``--plugin``/``-p`` values in raw arguments, before click parses them."""
    names = []
    it = iter(args)
    for arg in it:
        if arg in PLUGIN_FLAGS:
            names.append(next(it, ""))
        elif arg.startswith("--plugin="):
            names.append(arg.split("=", 1)[1])
        elif arg.startswith("-p") and len(arg) > 2 and not arg.startswith("--"):
            names.append(arg[2:])
    return names


class RunCommand(click.Command):
    """``bas run``: the plugins named on the command line add their options before parsing."""

    def plugin_options(self, plugins: Plugins) -> list:
        return plugins.run_options()

    def parse_args(self, ctx, args):
        base = [p for p in self.params if not getattr(p, "_from_plugin", False)]
        try:
            plugins = Plugins(prescan_plugins(args))
            added = self.plugin_options(plugins)
        except BasError as exc:
            raise click.ClickException(str(exc)) from None
        seen = {name: "bas" for p in base for name in p.opts}
        for plugin, opt in added:
            for name in opt.opts:
                if name in seen:
                    raise click.ClickException(f"Option {name} is added by both {seen[name]} and plugin '{plugin}'; turn one of them off with --plugin no:{plugin}.")
                seen[name] = f"plugin '{plugin}'"
            opt._from_plugin = True
        self.params = base + [opt for _, opt in added]
        ctx.meta["bas.plugins"] = plugins
        return super().parse_args(ctx, args)


class MasksCommand(RunCommand):
    """``bas masks``: as ``bas run``, but only the options of mask sources and mask cleanup."""

    def plugin_options(self, plugins: Plugins) -> list:
        return plugins.mask_options()


@click.group(cls=BasGroup)
@click.version_option(bas.__version__, prog_name="bas")
def cli():
    """Teach a Stable Diffusion model several concepts from one image (Break-A-Scene).

    Start with `bas demo`; then `bas run --image IMG --mask M0 --mask M1 --out OUT` and
    `bas generate OUT "a photo of <asset0> at the beach"`.
    """


@cli.command(cls=RunCommand)
@click.option("--image", type=click.Path(path_type=Path), help="The input image (any size; centre-cropped and resized).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (required, except with --plan).")
@click.option("--model", default=None, help="Hub id or local folder of a diffusers pipeline (Stable Diffusion 1.x/2.x, SDXL, or a family a plugin adds) "
              "[default: the family's: stabilityai/stable-diffusion-2-1-base, with --family sdxl stabilityai/stable-diffusion-xl-base-1.0, "
              "with --family flux black-forest-labs/FLUX.1-dev].")
@click.option("--family", default=None, help="Model family: sd, sdxl, flux, or one a plugin adds [default: detected from --model's model_index.json].")
@click.option("--plugin", "-p", "plugin_names", multiple=True, help="Turn on a plugin (repeatable); no:NAME turns a default one off. See `bas plugins`.")
@click.option("--phase1-steps", type=int, default=400, show_default=True, help="Steps of phase 1 (handles only).")
@click.option("--phase2-steps", type=int, default=400, show_default=True, help="Steps of phase 2 (weights + handles).")
@click.option("--phase1-lr", type=float, default=5e-4, show_default=True, help="Learning rate of phase 1.")
@click.option("--phase2-lr", type=float, default=None, help="Learning rate of phase 2 [default: the weight strategy's, 1e-4 for LoRA, 2e-6 full].")
@click.option("--phase2-handle-lr", type=float, default=2e-6, show_default=True, help="Learning rate of the handles in phase 2 (the reference code's), apart from the weights'.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resolution", type=int, default=None, help="Training resolution in pixels [default: the model's, 512 for SD 2.1 base].")
@click.option("--init-token", "init_tokens", multiple=True, help="A word to start each handle from, one per mask in order [default: 'object'].")
@click.option("--background", is_flag=True, help="Add a handle for the background: everything outside all masks (after the masks' handles).")
@click.option("--optimizer", default=None, help="adamw or adamw8bit (bitsandbytes, CUDA), or one a plugin adds [default: adamw; on CUDA the family may pick adamw8bit, see run.json's family_defaults].")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in the backward pass: less memory, ~30% slower [default: off; on CUDA on for sdxl and flux].")
@click.option("--quantize", type=click.Choice(["none", "nf4", "int8"]), default=None,
              help="Load the frozen base weights quantised (bitsandbytes, CUDA, LoRA only): nf4 (4-bit) or int8 [default: none; on CUDA nf4 for flux].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--flip-p", type=float, default=0.5, show_default=True, help="Probability of a horizontal flip of image and masks per step.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient norm clip (0: off).")
@click.option("--overwrite", is_flag=True, help="Replace a finished or interrupted run already in --out.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its newest checkpoint (same options).")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the run's memory plan per phase on --device (cuda need not be present) from the model's configs alone, and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --plan: the plan as JSON.")
@click.option("--vram", type=float, default=None,
              help="GB of GPU memory to fit: choose gradient checkpointing, 8-bit AdamW, quantised weights, a smaller LoRA rank, in that "
                   "order, where you chose none (README, 'Speed and memory').")
@click.pass_context
def run(ctx, plugin_names, plan_only, as_json, vram, **values):
    """Extract one handle per mask from an image: phase 1 (handles), then phase 2 (weights + handles)."""
    from bas.core.api import make_config
    from bas.core.training import extract

    plugins = ctx.meta["bas.plugins"]
    if as_json and not plan_only:
        raise BasError("--json prints a memory plan; add --plan.")
    if values["out"] is None:
        if not plan_only:
            raise BasError("Missing option '--out'; name the folder the run writes (only --plan needs none).")
        values["out"] = Path("bas-plan")  # nothing is written
    config = make_config(plugins, values, plugin_names)
    if vram is not None or plan_only:
        from bas.memory.plan import format_plan, make_plan
        from bas.memory.vram import describe, fit

        choice = None
        if vram is not None:
            explicit = {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
            choice = fit(config, plugins, vram, explicit)
            config = choice.config
            click.echo(describe(choice, vram), err=as_json)
        if plan_only:
            plan = choice.plan if choice else make_plan(config, plugins)
            if as_json:
                import json

                click.echo(json.dumps(plan.to_json(), indent=2))
            else:
                click.echo(format_plan(plan))
            return
    result = extract(config, plugins)
    info = result.info
    click.echo(f"Wrote {config.out}: " + ", ".join(info["files"] + ["run.json"]))
    background = f" ({info['background']} is the background)" if info.get("background") else ""
    click.echo(f"Handles: {' '.join(info['handles'])}{background}. Try: " + command_line("bas", "generate", config.out, f"a photo of {info['handles'][0]} at the beach"))


cli.add_command(make_batch_command(run))


@cli.command(cls=MasksCommand)
@click.option("--image", type=click.Path(path_type=Path), help="The input image.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for mask0.png, mask1.png, ..., img.png and preview.png.")
@click.option("--plugin", "-p", "plugin_names", multiple=True, help="The mask source: sam-masks, coco-masks or an installed one [default: files].")
@click.option("--model", "mask_model", default=None, help="The mask source's model: for sam-masks the SAM checkpoint, hub id or local folder [default: facebook/sam-vit-base].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N, for a source that runs a model.")
@click.option("--overwrite", is_flag=True, help="Replace masks already in --out.")
@click.pass_context
def masks(ctx, plugin_names, **values):
    """Make a scene's masks and a preview: bas masks --plugin sam-masks --image IMG --point X,Y --out DIR.

    Writes mask0.png, mask1.png, ... (one per concept, in handle order), img.png and preview.png
    (each mask tinted and labelled with its handle) into --out, which `bas run --scene` then takes.
    `bas masks --plugin NAME --help` lists a mask source's options.
    """
    from bas.core.masks import make_masks, make_masks_config

    plugins = ctx.meta["bas.plugins"]
    written = make_masks(make_masks_config(plugins, values, plugin_names), plugins)
    click.echo(f"Wrote {values['out']}: " + ", ".join(p.name for p in written))
    click.echo(f"Check {values['out'] / 'preview.png'}, then: " + command_line("bas", "run", "--scene", values["out"], "--out", "RUN"))


def parse_seeds(ctx, param, value):
    """``1,7,42`` as integers; their range is checked where the Python API checks it too
    (:func:`bas.core.generation.sampling_seeds`)."""
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
    for option in reversed([
        click.option("--num-images", type=COUNT, default=None, help="Images per prompt, seeds seed, seed+1, ... [default: 4 for generate, 1 for edit]."),
        click.option("--seed", type=int, default=0, show_default=True, help=f"The first seed, 0 to {MAX_SEED}."),
        click.option("--seeds", callback=parse_seeds, default=None, help="Exact seeds, comma-separated (such as 1,7,42); overrides --seed and --num-images."),
        click.option("--steps", type=COUNT, default=None, help=f"Sampling steps [default: {SAMPLING_STEPS}; 4 for a FLUX.1-schnell run, as its model card]."),
        click.option("--guidance", type=float, default=None, callback=finite,
                     help="Guidance scale: classifier-free, or FLUX.1-dev's distilled guidance [default: 7.5; flux 3.5, schnell 0 (it has none)]."),
        click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default=None,
                     help="Sampler [default: ddim, the paper's; flow-euler for flux, the one flow-matching sampler]."),
        click.option("--width", type=int, default=None, help="Image width, a multiple of 8 [default: the run's resolution]."),
        click.option("--height", type=int, default=None, help="Image height, a multiple of 8 [default: the run's resolution]."),
        click.option("--prompts-file", type=click.Path(path_type=Path), default=None, help="A text file with one prompt per line (# starts a comment)."),
        click.option("--negative-prompt", default=None, help="What the images should not show."),
        click.option("--lora-scale", type=float, default=1.0, show_default=True, callback=finite, help="Strength of the run's LoRA (0: base model + handles)."),
        click.option("--device", default="auto", show_default=True),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True),
    ]):
        command = option(command)
    return command


def read_prompts(prompts, prompts_file) -> list[str]:
    from bas.core.generation import read_prompts_file

    return list(prompts) + (read_prompts_file(prompts_file) if prompts_file else [])


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("prompts", nargs=-1)
@sampling_options
@click.option("--variations", is_flag=True, help="Add the prompt naming every handle: variations of the whole scene.")
@click.option("--grid/--no-grid", default=True, show_default=True, help="Also write a grid (a row per prompt, a column per seed).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, help="Where to write PNGs [default: OUT/samples].")
def generate(out, prompts, prompts_file, variations, num_images, **options):
    """Generate images from a finished run: bas generate OUT "a photo of <asset0> at the beach"."""
    from bas.core.generation import all_handles_prompt, generate_images, read_run

    prompts = read_prompts(prompts, prompts_file)
    if variations:
        prompts.append(all_handles_prompt(read_run(out)["handles"]))
    if not prompts:
        raise BasError('No prompt; pass one such as "a photo of <asset0> at the beach", --prompts-file FILE or --variations.')
    for path in generate_images(out, prompts, num_images=num_images or 4, **options):
        click.echo(str(path))


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("prompts", nargs=-1)
@click.option("--image", required=True, type=click.Path(path_type=Path), help="The image to edit (centre-cropped to the output's aspect and resized, as `bas run` does).")
@click.option("--mask", required=True, type=click.Path(path_type=Path), help="PNG, white where the prompt's content goes.")
@sampling_options
@click.option("--blend-start", type=float, default=0.25, show_default=True,
              help="Fraction of the schedule skipped: sampling starts from pure noise this far in (the script's --blending_start_percentage).")
@click.option("--composite", is_flag=True, help="Paste the input's pixels outside the mask over the result (beyond the reference script).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, help="Where to write PNGs [default: OUT/edits].")
def edit(out, prompts, prompts_file, num_images, **options):
    """Put a concept into a region of any image: bas edit OUT --image IMG --mask M "a photo of <asset1>".

    Blended Latent Diffusion as the paper's reference script runs it: a quarter into the schedule,
    the prompt is generated inside the mask while outside it the image's latents, noised afresh,
    replace the sample's after every step.
    """
    from bas.core.editing import edit_images

    prompts = read_prompts(prompts, prompts_file)
    if not prompts:
        raise BasError('No prompt; pass one such as "a photo of <asset1>" or --prompts-file FILE.')
    for path in edit_images(out, prompts, num_images=num_images or 1, **options):
        click.echo(str(path))


@cli.command("export")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="diffusers", show_default=True,
              help="diffusers; kohya (AUTOMATIC1111, ComfyUI); lora-from-full (a full fine-tune as a LoRA).")
@click.option("--out", "dest", required=True, type=click.Path(path_type=Path), help="Folder to write the export into.")
@click.option("--rank", type=int, default=32, show_default=True, help="Rank of a LoRA made from a full fine-tune by low-rank difference.")
@click.option("--name", default=None, help="Name of the kohya LoRA file and embedding prefix [default: the run folder's name].")
@click.option("--preview/--no-preview", default=True, show_default=True,
              help="Put a preview.png in the export: the newest validation grid of the run's report, or one generated when it has none.")
@click.option("--preview-steps", type=COUNT, default=None,
              help="Sampling steps of a generated preview (with the run's family's sampler and guidance, as bas generate's defaults) "
                   "[default: 25, or bas generate's steps for the run where fewer: 4 for FLUX.1-schnell].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
def export(out, fmt, dest, **options):
    """Export a run for diffusers, AUTOMATIC1111 or ComfyUI: bas export OUT --format kohya --out DIR."""
    from bas.core.export import export_run

    written = export_run(out, fmt, dest, **options)
    top = sorted({p.relative_to(dest).parts[0] + ("/" if len(p.relative_to(dest).parts) > 1 else "") for p in written})
    click.echo(f"Wrote {dest}: {', '.join(top)}. See {dest / 'README.md'}.")


cli.add_command(eval_command(RunCommand))


@cli.command("tiny-model")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default="epsilon", show_default=True)
@click.option("--family", default=None, help="Model family of the pipeline: sd, sdxl, flux, or one a plugin adds [default: sd, the default model's].")
@click.option("--overwrite", is_flag=True, help="Replace a model folder already at DIRECTORY (never a folder of anything else).")
def tiny_model(directory, seed, prediction_type, family, overwrite):
    """Write a tiny random pipeline of a model family (diffusers format) for offline tests."""
    from bas.core.family import default_family, get_family
    from bas.core.tiny import check_model_target, save_tiny_model

    check_model_target(directory, overwrite)  # before the model is built
    plugins = Plugins()
    chosen = get_family(plugins, family) if family else default_family(plugins)
    save_tiny_model(directory, seed=seed, prediction_type=prediction_type, family=chosen, overwrite=overwrite)
    click.echo(f"Wrote {directory} (loads with {chosen.pipeline_class}.from_pretrained).")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("bas-demo"), show_default=True)
@click.option("--steps", type=COUNT, default=100, show_default=True, help="Steps per phase.")
@click.option("--model", default="bas-mini", show_default=True, help="bas-mini (shipped), or a pipeline folder such as one `bas tiny-model` writes.")
def demo(out, steps, model):
    """Offline demo: draw a scene of concepts bas-mini cannot name, extract them, recompose them."""
    from PIL import Image

    from bas.core.api import extract, generate as generate_api
    from bas.core.demo import DEMO_PROMPTS, check_demo_out, contact_sheet, draw_mini_scene
    from bas.mini import NAME

    check_demo_out(out)
    click.echo(f"Drawing a scene in {out / 'scene'} and extracting its two concepts into {model} ...")
    scene = draw_mini_scene(out / "scene")
    # bas-mini's 64-d embeddings and small UNet move too little in 100 steps at Stable Diffusion's learning rates
    extra = {"phase1_lr": 5e-3, "phase2_lr": 1e-3} if model == NAME else {}
    result = extract(scene / "img.png", [scene / "mask0.png", scene / "mask1.png"], out / "run", model=model,
                     phase1_steps=steps, phase2_steps=steps, init_tokens=["circle", "square"], overwrite=True, device="cpu", **extra)
    paths = generate_api(out / "run", [p for _, p in DEMO_PROMPTS], num_images=2, steps=25, grid=False, device="cpu")
    labels = [f"{label} #{k}" for label, _ in DEMO_PROMPTS for k in range(2)]  # generate's order: per prompt, its images
    tiles = [("input", Image.open(scene / "img.png"))] + [(f"mask{i}", Image.open(scene / f"mask{i}.png")) for i in range(2)]
    tiles += [(label, Image.open(path)) for label, path in zip(labels, paths)]
    contact_sheet(out / "demo.png", tiles)
    t = result.info["times"]
    click.echo(f"Extraction took {t['total_s']:.1f}s. Wrote {out / 'run'} and {len(paths)} images; overview: {out / 'demo.png'}")
    if model == NAME:
        click.echo("bas-mini never saw purple, orange or dots in its captions: what it draws for the handles it learned from this one "
                   "image. It is a 5M-parameter model trained on a CPU: expect a concept's colour and shape, its texture less often (README, 'bas-mini').")


@cli.command("plugins")
def list_plugins():
    """List every plugin: what it provides, whether it is on by default, where it comes from."""
    from bas.core.evaluation import eval_options

    manager = Plugins(all_installed=True, tolerant=True)
    provides: dict[str, list[str]] = {}
    for kind in REGISTER_HOOKS:
        for entry in manager.registry(kind).entries.values():
            provides.setdefault(entry.plugin, []).append(f"{kind} '{entry.name}'")
    options: dict[str, list[str]] = {}
    for plugin, opt in manager.run_options() + eval_options(manager) + manager.batch_options():
        options.setdefault(plugin, []).append(opt.opts[0])
    for name in available_plugin_names():
        if name in manager.broken:
            click.echo(f"{name}  [broken: {manager.broken[name]}]")
            continue
        info = manager.infos[name]
        state = "on by default" if info.default else "opt-in (--plugin " + name + ")"
        click.echo(f"{name}  [{state}; {info.source}]")
        if info.description:
            click.echo(f"    {info.description}")
        if provides.get(name):
            click.echo(f"    provides: {', '.join(provides[name])}")
        if options.get(name):
            click.echo(f"    options: {' '.join(options[name])}")
    if manager.broken:
        names = ", ".join(sorted(manager.broken))
        click.echo(f"Warning: {len(manager.broken)} plugin(s) could not be loaded ({names}); see their lines above.", err=True)
    for entry in shadowed_entry_points():
        click.echo(f"Warning: the installed plugin {entry} has the name of a built-in plugin and is never loaded; rename its entry point.", err=True)


cli.add_command(ui_command)


def add_plugin_commands(group: click.Group) -> list[str]:
    """Add every installed plugin's commands to ``group``; return warnings about what was left out.

    Each plugin registers into a group of its own, so it cannot remove or replace a command; a
    command named as one ``group`` has already is left out, as are both of two plugins' commands
    of one name; a plugin that fails to import or raises (``sys.exit`` included) is named and
    skipped while the others' commands work.
    """
    from bas.core.plugins import PerPlugin

    own = set(group.commands)
    manager = Plugins(all_installed=True, tolerant=True)
    groups: dict[str, click.Group] = {}

    def group_for(plugin: str) -> click.Group:
        return groups.setdefault(plugin, click.Group(name=plugin))

    manager.call_each("bas_register_commands", cli=PerPlugin(group_for))
    warnings = [f"plugin '{name}' was skipped: {message}" for name, message in manager.broken.items()]
    offered: dict[str, list[tuple[str, click.Command]]] = {}
    for plugin, plugin_group in groups.items():
        if plugin in manager.broken:
            continue
        for name, command in plugin_group.commands.items():
            offered.setdefault(name, []).append((plugin, command))
    for name, offers in sorted(offered.items()):
        plugins = [plugin for plugin, _ in offers]
        if name in own:
            warnings.append(f"plugin '{plugins[0]}' adds a command '{name}', which bas has already; it is left out.")
        elif len(offers) > 1:
            warnings.append(f"plugins {' and '.join(plugins)} both add a command '{name}'; neither is used (uninstall one).")
        else:
            group.add_command(offers[0][1], name)
    return warnings


def main(args: list[str] | None = None) -> None:
    """Entry point: every user error is one ``Error: ...`` line on stderr and a non-zero exit."""
    _quiet_libraries()
    try:
        cli.main(args=args, prog_name="bas", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as exc:
        from bas.option_hints import unknown_option_message

        named = unknown_option_message(exc) if isinstance(exc, click.NoSuchOption) else None  # diffusers' names
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        click.echo(f"Error: {named or exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)  # EXIT_USAGE, or EXIT_ERROR for a refused value (BasGroup.invoke)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
